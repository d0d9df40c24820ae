"""Purging and deletion: what is deleted when, verified."""
