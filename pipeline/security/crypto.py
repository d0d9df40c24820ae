"""Client-key encryption: inputs and face data are AES-256-GCM ciphertext under the device key.

The key is 32 random bytes held on the user's device. It reaches the service in a request
header, lives in memory for the job's life only, and is never logged, stored or sent to
Redis. Each ciphertext is bound to its object URI (GCM associated data), so an object copied
to another name does not decrypt.

Layout of a stored object: b"EPH2" | 12-byte nonce | ciphertext+tag.

Key separation: the device key itself never encrypts anything. HKDF-SHA256 derives one
subkey for the AES-GCM encryption done here (``app_key``) and another for the provider's
server-side encryption (S3 SSE-C, GCS CSEK: ``provider_key``), so a provider that keeps the
key it was sent still holds nothing that opens the ciphertext inside.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pipeline.core.errors import InvalidUpload, WrongKey

KEY_BYTES = 32
NONCE_BYTES = 12
MAGIC = b"EPH2"
_APP_INFO = b"ephemera/v2/app-aes-gcm"
_PROVIDER_INFO = b"ephemera/v2/provider-sse"


def _derive(device_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
        device_key)


def app_key(device_key: bytes) -> bytes:
    """The subkey of the in-application AES-GCM encryption."""
    return _derive(device_key, _APP_INFO)


def provider_key(device_key: bytes) -> bytes:
    """The subkey sent to a provider for SSE-C / CSEK: unrelated to ``app_key``."""
    return _derive(device_key, _PROVIDER_INFO)


def check_device_key(header_value: str | None) -> bytes:
    """Parse the device-key header (base64 of 32 random bytes). Never echoes the value."""
    if not header_value:
        raise InvalidUpload(
            "header X-Device-Key is missing; send 32 random bytes, base64-encoded",
            problem="malformed",
        )
    try:
        key = base64.b64decode(header_value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidUpload("header X-Device-Key is not valid base64", problem="malformed") from None
    if len(key) != KEY_BYTES:
        raise InvalidUpload(
            f"header X-Device-Key decodes to {len(key)} bytes; it must be {KEY_BYTES}",
            problem="malformed",
        )
    return key


def new_device_key() -> bytes:
    """A fresh key, as a device makes one (used by the demo and tests)."""
    return os.urandom(KEY_BYTES)


def encrypt(plaintext: bytes, key: bytes, *, uri: str) -> bytes:
    """Encrypt ``plaintext`` for storage at ``uri``."""
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(app_key(key)).encrypt(nonce, plaintext, uri.encode())


def decrypt(blob: bytes, key: bytes, *, uri: str) -> bytes:
    """Decrypt an object read from ``uri``; raises WrongKey if it does not authenticate."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
        raise WrongKey("stored object is not Ephemera ciphertext")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(app_key(key)).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :],
                                            uri.encode())
    except InvalidTag:
        raise WrongKey(
            "stored object did not decrypt with this device key; upload again from the "
            "device that holds the key"
        ) from None
