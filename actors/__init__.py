"""Thin Ray wrappers: each actor declares resources, loads its model once, calls pipeline/."""
