"""The API's bodies as pydantic models: the service answers with them (FastAPI's
``response_model``, so docs/openapi.json declares them) and the typed client
(serve/client.py) parses every answer into them. One module, so the two cannot drift.

No model holds media, a key, an input's URI or a file name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from pipeline.core.records import JobKind, JobStatus


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="The error's type, e.g. InvalidUpload, NotFound.")
    detail: str = Field(description="What went wrong and how to fix it; never echoes input.")


class JobAccepted(BaseModel):
    """202 to POST /v1/jobs."""

    job_id: str
    status: JobStatus = Field(description="queued")
    status_url: str = Field(description="GET it for the job's status (also in Location)")
    replayed: bool = Field(description="true: an Idempotency-Key retry of an earlier request")


class BatchSizes(BaseModel):
    face: int = Field(description="jobs in the face-stage model call that served this job")
    diffusion: int = Field(description="jobs in the diffusion model call")


class Progress(BaseModel):
    frames_done: int
    frames_total: int


class JobView(BaseModel):
    """A job as its account sees it: never an input's URI, never a key."""

    job_id: str
    status: JobStatus
    kind: JobKind | None = Field(description="null once the record was minimised")
    style: str | None = None
    resolution_px: int | None = None
    reason: str | None = Field(None, description="why it failed, and what to upload instead")
    num_inputs: int
    output_ids: list[str]
    output_urls: list[str]
    created_s: float
    succeeded_s: float | None = None
    finished_s: float | None = None
    inputs_purged_s: float | None = Field(None, description="when every input and all face "
                                          "data were deleted and verified gone")
    num_inputs_purged_verified: int
    attempts: int
    batch_sizes: BatchSizes
    progress: Progress | None = Field(None, description="clips only")
    minimised_s: float | None = Field(None, description="when personal fields were dropped")


class JobsPage(BaseModel):
    account_id: str
    jobs: list[JobView] = Field(description="oldest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null "
                                    "at the end")


class OutputItem(BaseModel):
    output_id: str
    job_id: str
    media_type: str
    created_s: float
    size_bytes: int
    url: str = Field(description="GET it for the output's bytes")


class OutputsPage(BaseModel):
    account_id: str
    outputs: list[OutputItem] = Field(description="oldest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null "
                                    "at the end")


class SignedUrl(BaseModel):
    url: str
    expires_in_s: int


class DeletionStarted(BaseModel):
    """A deletion: ``complete`` when it was carried out and verified before the answer
    (one output), ``pending`` when a retention actor carries it out within seconds."""

    receipt_id: str
    status: str = Field(description="complete | pending")
    receipt_url: str
    new_jobs: str | None = Field(None, description="'refused' after an under-13 signal")


class LeafOpening(BaseModel):
    """Opens the leaf's ``subject`` commitment: private to the account's receipt."""

    salt: str = Field(description="hex, 32 random bytes of this leaf")
    account_ref: str = Field(description="the account's keyed pseudonym")
    uri_sha256: str = Field(description="SHA-256 of the deleted object's URI")


class ReceiptEntry(BaseModel):
    """One verified deletion: a leaf of the transparency log and its inclusion proof."""

    leaf_index: int
    leaf: str = Field(description="base64 of the leaf's canonical JSON (public)")
    leaf_hash: str = Field(description="hex SHA-256(0x00 || leaf)")
    object_class: str
    requested_ms: int
    verified_ms: int
    result: str = Field(description="verified_gone")
    inclusion_proof: list[str] | None = Field(
        description="hex hashes, leaf to root, against `head`; null until a signed head "
        "covers the leaf (retention.yaml transparency.head_interval_s)")
    opening: LeafOpening


class TreeHead(BaseModel):
    """A signed tree head: the checkpoint is what is signed and what a client verifies."""

    origin: str
    tree_size: int
    root_hash: str = Field(description="hex")
    timestamp_ms: int
    checkpoint: str = Field(description="C2SP tlog-checkpoint signed note (Ed25519)")


class DeletionReceipt(BaseModel):
    receipt_id: str
    kind: str = Field(description="output | account | job_purge")
    status: str = Field(description="pending | complete")
    account_ref: str = Field(description="the account's keyed pseudonym")
    subject_sha256: str
    requested_s: float
    updated_s: float | None = None
    objects: list[ReceiptEntry]
    head: TreeHead | None = Field(description="the signed head the proofs lead to")
    proof_status: str = Field(description="proven | pending (a proof waits for the next head)")


class TransparencyKey(BaseModel):
    origin: str
    algorithm: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 key")
    key_id: str = Field(description="hex signed-note key id")
    head_format: str
    hashing: str


class ConsistencyProof(BaseModel):
    first: int
    second: int
    proof: list[str] = Field(description="hex hashes (RFC 9162 2.1.4)")


class OptOutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    opt_out: StrictBool = Field(description="true: opt out of sale and sharing; false: opt "
                                "back in")


class OptOutResult(BaseModel):
    account_id: str
    opted_out_of_sale_and_sharing: bool
    request_id: str


class AgeSignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    under_13: StrictBool = Field(description="true: the account belongs to a child under 13")


class AgeSignalNoAction(BaseModel):
    account_id: str
    status: str = Field(description="no action")


class ExportedOutput(BaseModel):
    output_id: str
    job_id: str
    created_s: float
    media_type: str
    size_bytes: int
    provider: str
    region: str


class ExportedJob(BaseModel):
    job_id: str
    kind: str
    style: str
    status: JobStatus
    created_s: float
    finished_s: float | None
    reason: str | None
    num_inputs: int
    inputs_purged_s: float | None
    num_inputs_purged_verified: int
    input_locations: list[str] = Field(description="provider and bucket, never a key")
    output_ids: list[str]


class ExportedReceipt(BaseModel):
    receipt_id: str
    kind: str | None
    status: str | None
    requested_s: float
    objects_verified_gone: int


class ExportedRequest(BaseModel):
    request_id: str
    kind: str
    received_s: float
    acknowledged_s: float | None
    completed_s: float | None
    receipt_id: str | None


class AccountFlags(BaseModel):
    opted_out_of_sale_and_sharing: bool


class PrivacyExport(BaseModel):
    """The right to know: every category and piece of data held for the account."""

    account_id: str
    categories: dict[str, str]
    outputs: list[ExportedOutput]
    jobs: list[ExportedJob]
    deletion_receipts: list[ExportedReceipt]
    privacy_requests: list[ExportedRequest]
    usage: list[dict[str, object]] = Field(description="one event per job, nothing personal")
    flags: AccountFlags
    not_held: list[str]


class Health(BaseModel):
    status: str = Field(description="ok")
