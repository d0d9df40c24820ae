"""Bucket posture checks: refuse to run on a bucket whose settings would silently break a
privacy promise (deletes that do not delete, retention longer than 4 days, wrong region).

Run by ``ephemera storage check`` and by the launcher before the service starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import ClientError

from pipeline.core.config import US_AWS_REGIONS, S3Config, StorageConfig
from pipeline.storage.base import FACE_PREFIX, INPUT_PREFIX, WORK_PREFIX, StoreSet

MAX_BACKSTOP_DAYS = 1
PURGED_PREFIXES = (INPUT_PREFIX, FACE_PREFIX, WORK_PREFIX)


@dataclass(frozen=True, slots=True)
class PostureProblem:
    bucket: str
    setting: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"bucket {self.bucket}: {self.setting} is {self.found}; {self.fix}"


def _s3_error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _s3_lifecycle(client, bucket: str) -> list[dict]:
    try:
        return client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
    except ClientError as exc:
        if _s3_error_code(exc) == "NoSuchLifecycleConfiguration":
            return []
        raise


def _s3_rule_prefix(rule: dict) -> str:
    filt = rule.get("Filter") or {}
    return str(filt.get("Prefix", (filt.get("And") or {}).get("Prefix", rule.get("Prefix", ""))))


def check_s3_bucket(client, cfg: S3Config, *, holds_inputs: bool) -> list[PostureProblem]:
    """Location, versioning, Object Lock and (for input buckets) the lifecycle backstop."""
    bucket, problems = cfg.bucket, []
    location = client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
    if location not in US_AWS_REGIONS or location != cfg.region:
        problems.append(PostureProblem(bucket, "location", location,
                                       f"use a bucket in {cfg.region} (US regions only)"))
    rules = _s3_lifecycle(client, bucket)
    versioning = client.get_bucket_versioning(Bucket=bucket).get("Status")
    if versioning in ("Enabled", "Suspended"):
        expires_noncurrent = any(
            r.get("Status") == "Enabled"
            and (r.get("NoncurrentVersionExpiration") or {}).get("NoncurrentDays", 99)
            <= MAX_BACKSTOP_DAYS for r in rules)
        if not (cfg.versioned_bucket and expires_noncurrent):
            problems.append(PostureProblem(
                bucket, "versioning", versioning,
                "a DELETE would only add a delete marker: use an unversioned bucket, or set "
                "s3.versioned_bucket: true (deletes by version id) and add a "
                "NoncurrentVersionExpiration rule of 1 day"))
    try:
        lock = client.get_object_lock_configuration(Bucket=bucket)
        if lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled":
            problems.append(PostureProblem(bucket, "Object Lock", "enabled",
                                           "media buckets must not lock objects: use a "
                                           "bucket created without Object Lock"))
    except ClientError as exc:
        if _s3_error_code(exc) != "ObjectLockConfigurationNotFoundError":
            raise
    if holds_inputs:
        for prefix in PURGED_PREFIXES:
            if not any(r.get("Status") == "Enabled" and _s3_rule_prefix(r) == prefix
                       and (r.get("Expiration") or {}).get("Days", 99) <= MAX_BACKSTOP_DAYS
                       for r in rules):
                problems.append(PostureProblem(
                    bucket, f"lifecycle rule for {prefix}", "missing",
                    f"add a rule expiring prefix {prefix} after {MAX_BACKSTOP_DAYS} day "
                    "(the backstop behind the purge)"))
    return problems


def check_gcs_bucket(bucket, expected_region: str, *, holds_inputs: bool) -> list[PostureProblem]:
    """``bucket``: a reloaded google.cloud.storage Bucket (or one built from a recorded
    bucket resource). Soft delete, retention, holds, versioning, lifecycle, location."""
    name, problems = bucket.name, []
    soft_delete_s = (bucket._properties.get("softDeletePolicy") or {}).get(
        "retentionDurationSeconds")
    if soft_delete_s is None or int(soft_delete_s) != 0:
        problems.append(PostureProblem(
            name, "soft-delete retention", f"{soft_delete_s or 'the default 604800'} s",
            "set it to 0: deleted objects would stay restorable longer than the 4-day promise"))
    if bucket.retention_period:
        problems.append(PostureProblem(name, "retention policy", f"{bucket.retention_period} s",
                                       "remove it: it blocks deletion"))
    if bucket.default_event_based_hold:
        problems.append(PostureProblem(name, "default event-based hold", "on",
                                       "turn it off: held objects cannot be deleted"))
    if bucket.versioning_enabled:
        problems.append(PostureProblem(name, "versioning", "enabled",
                                       "turn it off: deletes would keep noncurrent versions"))
    location = (bucket.location or "").lower()
    if location != expected_region.lower():
        problems.append(PostureProblem(name, "location", location or "unknown",
                                       f"use a bucket in {expected_region}, as routed in "
                                       "storage.yaml"))
    if holds_inputs:
        for prefix in PURGED_PREFIXES:
            if not any((r.get("action") or {}).get("type") == "Delete"
                       and (r.get("condition") or {}).get("age", 99) <= MAX_BACKSTOP_DAYS
                       and prefix in ((r.get("condition") or {}).get("matchesPrefix") or [])
                       for r in bucket.lifecycle_rules):
                problems.append(PostureProblem(
                    name, f"lifecycle rule for {prefix}", "missing",
                    f"add a Delete rule with age {MAX_BACKSTOP_DAYS} and matchesPrefix "
                    f"{prefix} (the backstop behind the purge)"))
    return problems


def check_storage(cfg: StorageConfig, stores: StoreSet) -> list[PostureProblem]:
    """Every configured cloud bucket; the local store has no settings to check."""
    problems: list[PostureProblem] = []
    for store in stores.all():
        holds_inputs = store in stores.input_stores.values()
        if store.provider == "aws" and cfg.s3 is not None:
            problems += check_s3_bucket(store.client, cfg.s3,  # type: ignore[attr-defined]
                                        holds_inputs=holds_inputs)
        elif store.provider == "gcp":
            bucket = store.client.bucket(store.bucket)  # type: ignore[attr-defined]
            bucket.reload()
            problems += check_gcs_bucket(bucket, store.region, holds_inputs=holds_inputs)
    return problems
