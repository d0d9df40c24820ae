"""Ephemera's pure core: records, configs, stages, retention, storage and crypto.

Nothing in this package imports ``ray``; the Ray wrappers live in ``actors/`` and ``serve/``.
"""
