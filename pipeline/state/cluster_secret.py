"""The secrets a process needs before it computes a pseudonym, checked once at its start.

Every Serve deployment that computes account pseudonyms (ingress, media, job runner,
retention, the GPU pools) and every CLI command that does calls ``check_process_secrets``
first. A production-shaped config (``Settings.production_markers``) then needs both secrets
(pipeline/security/pseudonyms.py, ``check_secrets``), and all processes of one cluster must
hold the same account secret: otherwise a node would name output folders, receipts, usage
rows and the under-13 block differently, and a blocked child's account would not be blocked
there. Redis holds a fingerprint of the cluster's secret (``keys.ACCOUNT_SECRET_FINGERPRINT``,
an HMAC of a fixed label under the secret, never the secret), set by the first process to
start; every later process compares its own and refuses to start on a mismatch.

Rotation: the account secret is never rotated (outputs and receipts are named by it). A
deliberate change means a new cluster: with the old fingerprint in Redis every node with the
new secret refuses to start.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.core.config import Settings
from pipeline.security.pseudonyms import SECRET_ENV, check_secrets, secret_fingerprint
from pipeline.state import keys


class _Client(Protocol):
    def set(self, name: str, value: str, *, nx: bool = ...) -> object: ...
    def get(self, name: str) -> bytes | str | None: ...


def check_cluster_secret(client: _Client) -> None:
    """Record this process's account-secret fingerprint if the cluster has none yet, else
    compare: raise ValueError when this node's secret differs from the cluster's."""
    mine = secret_fingerprint()
    client.set(keys.ACCOUNT_SECRET_FINGERPRINT, mine, nx=True)  # first process wins
    theirs = client.get(keys.ACCOUNT_SECRET_FINGERPRINT)
    if isinstance(theirs, bytes):
        theirs = theirs.decode()
    if theirs != mine:
        raise ValueError(f"this node's {SECRET_ENV} differs from the cluster's (Redis holds "
                         f"another fingerprint under {keys.ACCOUNT_SECRET_FINGERPRINT}); give "
                         "every node the same secret: a different one names outputs, receipts, "
                         "usage rows and under-13 blocks differently")


def check_process_secrets(settings: Settings, client: _Client) -> None:
    """At a process's start: both secrets when the config is production-shaped (none but a
    short one otherwise), and the cluster's account secret."""
    markers = settings.production_markers
    check_secrets(markers)
    if markers:
        check_cluster_secret(client)
