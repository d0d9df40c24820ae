"""crypto: AES-GCM under the device key, bound to the object URI; the key header is checked."""

from __future__ import annotations

import base64

import pytest

from pipeline.core.errors import InvalidUpload, WrongKey
from pipeline.security import crypto
from serve.errors import http_status
from tests.unit.factories import encode, photo

URI = "file:///store/inputs/job1/a.bin"


def test_round_trip_returns_the_plaintext():
    key = crypto.new_device_key()
    plain = encode(photo(64, 64), "PNG")

    assert crypto.decrypt(crypto.encrypt(plain, key, uri=URI), key, uri=URI) == plain


def test_ciphertext_does_not_contain_the_plaintext():
    key = crypto.new_device_key()
    plain = encode(photo(64, 64), "PNG")

    blob = crypto.encrypt(plain, key, uri=URI)

    assert blob.startswith(crypto.MAGIC)
    assert plain not in blob
    assert b"IHDR" not in blob and b"\x89PNG" not in blob
    assert URI.encode() not in blob  # associated data is authenticated, not stored


def test_two_encryptions_differ_by_nonce():
    key = crypto.new_device_key()
    assert crypto.encrypt(b"same", key, uri=URI) != crypto.encrypt(b"same", key, uri=URI)


def test_wrong_key_is_refused():
    blob = crypto.encrypt(b"face embedding", crypto.new_device_key(), uri=URI)

    with pytest.raises(WrongKey):
        crypto.decrypt(blob, crypto.new_device_key(), uri=URI)


def test_ciphertext_moved_to_another_uri_does_not_decrypt():
    key = crypto.new_device_key()
    blob = crypto.encrypt(b"face embedding", key, uri=URI)

    with pytest.raises(WrongKey):
        crypto.decrypt(blob, key, uri="file:///store/inputs/job2/a.bin")


@pytest.mark.parametrize("damage", ["flip_last_byte", "truncate", "not_ephemera"])
def test_damaged_ciphertext_is_refused(damage):
    key = crypto.new_device_key()
    blob = crypto.encrypt(b"face embedding", key, uri=URI)
    damaged = {
        "flip_last_byte": blob[:-1] + bytes([blob[-1] ^ 1]),
        "truncate": blob[:20],
        "not_ephemera": b"\x89PNG" + blob[4:],
    }[damage]

    with pytest.raises(WrongKey):
        crypto.decrypt(damaged, key, uri=URI)


# --- the X-Device-Key header ----------------------------------------------------------


def test_valid_header_yields_the_32_key_bytes():
    key = crypto.new_device_key()
    assert crypto.check_device_key(base64.b64encode(key).decode()) == key
    assert crypto.check_device_key(" " + base64.b64encode(key).decode() + "\n") == key


BAD_HEADERS = {
    "missing": None,
    "empty": "",
    "blank": "   ",
    "not_base64": "this-is-not-base64!!",
    "non_ascii": "clé-secrète",
    "16_bytes": base64.b64encode(b"s3cr3t-k3y-16byt").decode(),
    "64_bytes": base64.b64encode(b"x" * 64).decode(),
}


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_header_is_refused_without_echoing_it(header):
    with pytest.raises(InvalidUpload) as info:
        crypto.check_device_key(header)

    assert http_status(info.value) == 400
    message = str(info.value)
    assert "X-Device-Key" in message
    if header and header.strip():
        assert header.strip() not in message


def test_the_provider_key_cannot_open_the_ciphertext_inside():
    """Key separation: SSE-C/CSEK get one HKDF subkey, the application's AES-GCM another;
    neither is the device key, and the provider's cannot decrypt the stored ciphertext."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pipeline.core.config import S3Config
    from pipeline.storage.s3 import S3ObjectStore

    key = crypto.new_device_key()
    assert len({key, crypto.app_key(key), crypto.provider_key(key)}) == 3
    blob = crypto.encrypt(b"a face", key, uri="s3://b/inputs/j/x.bin")
    nonce, body = blob[4:16], blob[16:]
    for wrong in (crypto.provider_key(key), key):
        with pytest.raises(InvalidTag):
            AESGCM(wrong).decrypt(nonce, body, b"s3://b/inputs/j/x.bin")
    store = S3ObjectStore.__new__(S3ObjectStore)
    store.cfg = S3Config(bucket="bkt", region="us-east-1", sse_c_inputs=True)
    assert store._sse_c(key)["SSECustomerKey"] == crypto.provider_key(key)
