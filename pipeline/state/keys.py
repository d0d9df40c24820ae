"""Every Redis key of the project: the whole schema, in one place.

Modules that read and write Redis (jobs, ledger, receipts, deletion) and scripts or tests
that inspect it take their keys from here; nothing else spells a key. Values hold no media,
no key material and no embedding (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

PREFIX = "eph:"

# Jobs and outputs (pipeline/state/job_store.py)
ACTIVE_JOBS = "eph:jobs:active"              # set of unfinished job ids
RUNNERS = "eph:runners"                      # zset runner_id -> lease expiry
INGRESSES = "eph:ingresses"                  # zset ingress_id -> lease expiry
PURGE_LAGS = "eph:metrics:purge_lag_s"       # list: newest 10,000 purge lags
PURGED_JOBS = "eph:jobs:purged"              # zset job_id -> inputs_purged_s (minimise, expire)

# The cluster's account secret (pipeline/state/cluster_secret.py): an HMAC fingerprint,
# never the secret; set by the first process, compared by every process at start; no TTL.
ACCOUNT_SECRET_FINGERPRINT = "eph:cluster:account-secret-fingerprint"


def worker_leases(worker: str) -> str:
    """Zset of the live workers of a kind (records.Worker): id -> lease expiry."""
    return {"runner": RUNNERS, "ingress": INGRESSES}[worker]


def job(job_id: str) -> str:
    """Hash of a JobRecord (lists as JSON)."""
    return f"eph:job:{job_id}"


def output(output_id: str) -> str:
    """Hash of an OutputRecord."""
    return f"eph:output:{output_id}"


def account_outputs(account_id: str) -> str:
    """Zset output_id -> created_s: the account's outputs."""
    return f"eph:acct:{account_id}:outputs"


def account_jobs(account_id: str) -> str:
    """Zset job_id -> created_s: the account's jobs (until their records are minimised)."""
    return f"eph:acct:{account_id}:jobs"


def account_minimised_jobs(ref: str) -> str:
    """Zset job_id -> created_s: the account's minimised job records (they left
    ``account_jobs``), keyed by the account's pseudonym, so that account deletion and the
    under-13 signal still find them. Removed with the records."""
    return f"eph:ref:{ref}:minimised-jobs"


def account_active(account_id: str) -> str:
    """Set of the account's unfinished job ids (the 429 limit). jobs.py's finish script
    builds the same name from the account id it reads: keep the two in step."""
    return f"eph:acct:{account_id}:active"


def account_tombstone(account_id: str) -> str:
    """Set while (and a day after) an account is deleted: no new job or output."""
    return f"eph:acct:{account_id}:deleting"


def account_deletion_lock(account_id: str) -> str:
    """Leased lock: one retention actor at a time deletes an account."""
    return f"eph:acct:{account_id}:deletion-lock"


def batch_fill(stage: str) -> str:
    """List: newest 1,000 batch fills (cost / max cost) of a stage."""
    return f"eph:metrics:batch_fill:{stage}"


def lock(name: str) -> str:
    """Short leased locks (one reaper at a time)."""
    return f"eph:lock:{name}"


# Retention ledger (pipeline/state/ledger.py)
RETENTION_DUE = "eph:ret:due"                # zset uri -> deadline_s
RETENTION_CREATED = "eph:ret:created"        # + ":<class>": zset uri -> created_s
PURGE_FAILURES = "eph:metrics:purge_failures"  # counter


def retention_record(uri: str) -> str:
    """Hash of a RetentionRecord."""
    return f"eph:ret:rec:{uri}"


def retention_job(job_id: str) -> str:
    """Set of the URIs registered for a job."""
    return f"eph:ret:job:{job_id}"


def retention_lease(uri: str) -> str:
    """A purge claim (SET NX with a lease)."""
    return f"eph:ret:lease:{uri}"


# Deletion receipts (pipeline/state/receipts.py, pipeline/retention/deletion.py)
# The hash chain of receipts before the transparency log: read once by the migration
# (pipeline/state/tlog.py, ``migrate_chain``), which deletes it.
RECEIPT_CHAIN = "eph:receipts:chain"         # list of hash-chained entries
RECEIPT_HEAD = "eph:receipts:head"           # hash: seq, hash of the last entry
PENDING_ACCOUNT_DELETIONS = "eph:deletions:pending"  # hash receipt_id -> account_id


def deletion_request(receipt_id: str) -> str:
    """Hash: a deletion request's kind, status and times."""
    return f"eph:deletion:{receipt_id}"


def deletion_entries(receipt_id: str) -> str:
    """List of a deletion request's log entries: JSON {leaf_index, salt, account_ref,
    uri_sha256} (the private opening of each leaf's subject); a bare integer is a chain
    sequence number from before the log, opened through ``TLOG_MIGRATED``."""
    return f"eph:deletion:{receipt_id}:entries"


# The transparency log of deletions (pipeline/state/tlog.py). Public data only:
# leaves hold salted commitments, never an account id, a pseudonym or an object key.
TLOG_SIZE = "eph:tlog:size"                  # leaves appended; WATCHed by every append
TLOG_HEADS = "eph:tlog:heads"                # zset checkpoint text -> tree size (signed heads)
TLOG_MIGRATED = "eph:tlog:migrated"          # hash chain seq -> opening JSON (migration)
TLOG_MIGRATION_DONE = "eph:tlog:migrated-through"  # last chain seq carried into the log
TLOG_MIGRATION_LOCK = "eph:tlog:migrating"   # SET NX PX: one migrator at a time


def tlog_nodes(level: int, chunk: int) -> str:
    """String of 32-byte perfect-subtree hashes at ``level``, nodes ``chunk * 2**16`` on."""
    return f"eph:tlog:node:{level}:{chunk}"


def tlog_leaves(chunk: int) -> str:
    """Hash leaf index -> leaf bytes (canonical JSON), leaves ``chunk * 2**16`` on."""
    return f"eph:tlog:leaf:{chunk}"


# Privacy rights (pipeline/privacy/rights.py)
PRIVACY_OPEN = "eph:privacy:open"            # zset request_id -> received_s (not completed)
OPTED_OUT_REFS = "eph:privacy:excluded-refs"  # set of account pseudonyms left out of shared usage


def privacy_request(request_id: str) -> str:
    """Hash of a PrivacyRequest: kind, account pseudonym, received/acknowledged/completed."""
    return f"eph:privacy:req:{request_id}"


def account_privacy_requests(ref: str) -> str:
    """Set of the account's privacy request ids (for the export), keyed by the account's
    pseudonym: recording a request never writes the raw account id."""
    return f"eph:ref:{ref}:privacy"


def account_receipts(account_id: str) -> str:
    """Set of the account's deletion receipt ids (for the export)."""
    return f"eph:acct:{account_id}:receipts"


def account_opt_out(account_id: str) -> str:
    """Set when the account opted out of sale and sharing."""
    return f"eph:acct:{account_id}:opt-out"


def blocked_account(account_ref: str) -> str:
    """Permanent: the account belongs to a child under 13; no job is ever accepted. Keyed
    by the pseudonym, so the block outlives the account without keeping its id."""
    return f"eph:blocked:{account_ref}"


def idempotency(account_ref: str, key: str) -> str:
    """A POST /v1/jobs Idempotency-Key: the request digest and the job it created."""
    return f"eph:idem:{account_ref}:{key}"
