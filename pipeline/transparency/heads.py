"""The deletion log's pure parts: leaves, keys and signed tree heads (no Redis).

A leaf is canonical JSON (sorted keys, no spaces) holding an object's class, two times, the
verifier's result and a salted commitment to (receipt id, account pseudonym, SHA-256 of the
object URI); its ``Opening`` stays private with the account's receipt. Signed tree heads are
C2SP ``tlog-checkpoint`` signed notes (the format of Sigstore and Go's checksum database),
body ``origin / size / base64 root / timestamp <unix ms>``, signed with Ed25519; the
standalone verifier (pipeline/transparency/verifier.py) checks them with no service code.
The log itself lives in Redis: pipeline/state/tlog.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.core.config import TransparencyConfig
from pipeline.transparency.verifier import Head, key_id, subject_commitment

LEAF_VERSION = 1
DEMO_SEED = hashlib.sha256(b"ephemera-demo-transparency-key--not-for-production").digest()



@dataclass(frozen=True, slots=True)
class Opening:
    """What opens a leaf's subject commitment: private, kept with the account's receipt."""

    leaf_index: int
    salt: str  # hex, 32 random bytes per leaf: leaves of one account cannot be linked
    account_ref: str
    uri_sha256: str

    def to_json(self) -> str:
        return json.dumps({"leaf_index": self.leaf_index, "salt": self.salt,
                           "account_ref": self.account_ref, "uri_sha256": self.uri_sha256},
                          sort_keys=True)


def make_leaf(*, receipt_id: str, account_ref: str, uri_sha256: str, object_class: str,
              requested_s: float, verified_s: float, result: str,
              salt: str | None = None) -> tuple[bytes, str]:
    """A leaf's canonical bytes and its salt. Public: the object's class, two times, the
    verifier's result and a salted commitment; no id, no pseudonym, no key, no digest."""
    salt = salt or secrets.token_hex(32)
    fields = {"v": LEAF_VERSION, "object_class": object_class,
              "requested_ms": round(requested_s * 1000), "verified_ms": round(verified_s * 1000),
              "result": result,
              "subject": subject_commitment(salt_hex=salt, receipt_id=receipt_id,
                                            account_ref=account_ref, uri_sha256=uri_sha256)}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode(), salt


# ---- signing keys ------------------------------------------------------------------------

def signing_key(cfg: TransparencyConfig, production_markers: Sequence[str]) -> Ed25519PrivateKey:
    """The log's Ed25519 key from ``cfg.signing_key_env`` (base64 of the 32-byte seed).
    A production-shaped config refuses to run without it; the embedded demo signs with a
    fixed, public demo key. A key that does not match ``cfg.public_key`` is refused."""
    value = os.environ.get(cfg.signing_key_env, "")
    if not value:
        if production_markers:
            raise ValueError(f"{cfg.signing_key_env} is not set; this config is production-"
                             f"shaped ({', '.join(production_markers)}), which needs the "
                             "transparency log's Ed25519 key (base64 of 32 random bytes: "
                             "`openssl rand -base64 32`)")
        seed = DEMO_SEED
    else:
        try:
            seed = base64.b64decode(value, validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{cfg.signing_key_env} must be base64 of 32 bytes (an Ed25519 "
                             "seed: `openssl rand -base64 32`)")
    key = Ed25519PrivateKey.from_private_bytes(seed)
    if cfg.public_key and public_key_b64(key.public_key()) != cfg.public_key:
        raise ValueError(f"{cfg.signing_key_env} does not match retention.yaml transparency."
                         "public_key: the log would sign heads no client can verify")
    return key


def log_public_key(cfg: TransparencyConfig,
                   production_markers: Sequence[str]) -> Ed25519PublicKey:
    """The key clients verify heads with: ``cfg.public_key`` when pinned (then only the
    signers need the private key), else the signing key's."""
    if cfg.public_key:
        raw = base64.b64decode(cfg.public_key, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    return signing_key(cfg, production_markers).public_key()


def key_description(cfg: TransparencyConfig, public: Ed25519PublicKey) -> dict[str, Any]:
    """``GET /v1/transparency/key``: what a client pins and how heads are made."""
    return {"origin": cfg.origin, "algorithm": "Ed25519", "public_key": public_key_b64(public),
            "key_id": key_id(cfg.origin, public).hex(),
            "head_format": "C2SP tlog-checkpoint signed note: origin, tree size, base64 root, "
                           "'timestamp <unix ms>'; signature line '\u2014 <origin> "
                           "base64(key_id || ed25519 signature)'",
            "hashing": "RFC 6962: SHA-256, leaf H(0x00 || leaf), node H(0x01 || left || right)"}


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def checkpoint(key: Ed25519PrivateKey, origin: str, size: int, root: bytes,
               timestamp_ms: int) -> str:
    """A signed note: body, a blank line, ``— <origin> base64(key id || signature)``."""
    body = f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntimestamp {timestamp_ms}\n"
    signature = key.sign(body.encode())
    blob = base64.b64encode(key_id(origin, key.public_key()) + signature).decode()
    return f"{body}\n\u2014 {origin} {blob}\n"


def head_json(head: Head) -> dict[str, Any]:
    return {"origin": head.origin, "tree_size": head.tree_size,
            "root_hash": head.root_hash.hex(), "timestamp_ms": head.timestamp_ms,
            "checkpoint": head.checkpoint}


# ---- the log -----------------------------------------------------------------------------
