"""Crypto (device-key encryption), pseudonyms (account secrets)."""
