"""Redis: every key, the job store, retention ledger, receipts, idempotency, metrics."""
