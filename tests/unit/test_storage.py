"""storage: the local object store, verified deletion, and URI/key parsing."""

from __future__ import annotations

import pytest

from pipeline.core.errors import StorageError
from pipeline.storage.base import (
    LocalObjectStore,
    account_digest,
    delete_verified,
    face_key,
    input_key,
    key_from_uri,
    object_uri,
    open_store,
    output_key,
)


def make_store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(f"file://{tmp_path / 'store'}")


def test_put_get_exists_delete(tmp_path):
    store = make_store(tmp_path)
    key = input_key("job1", "obj1")

    store.put(key, b"ciphertext")
    assert store.exists(key)
    assert store.get(key) == b"ciphertext"

    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(StorageError):
        store.get(key)


def test_put_overwrites_and_leaves_no_temporary_file(tmp_path):
    store = make_store(tmp_path)
    store.put("inputs/job1/a.bin", b"first")
    store.put("inputs/job1/a.bin", b"second")

    assert store.get("inputs/job1/a.bin") == b"second"
    assert list((store.root / ".tmp").iterdir()) == []


def test_delete_verified_returns_true_and_the_object_is_gone(tmp_path):
    store = make_store(tmp_path)
    key = face_key("job1", "emb")
    store.put(key, b"x")

    assert delete_verified(store, key) is True
    assert not store.exists(key)
    assert not (store.root / key).exists()


def test_deleting_a_missing_object_is_fine(tmp_path):
    store = make_store(tmp_path)
    store.delete("inputs/never/written.bin")
    assert delete_verified(store, "inputs/never/written.bin") is True


def test_delete_verified_raises_if_the_object_survives():
    class StickyStore:
        url = "mem://sticky"

        def delete(self, key: str) -> None:
            pass

        def exists(self, key: str) -> bool:
            return True

    with pytest.raises(StorageError):
        delete_verified(StickyStore(), "inputs/job1/a.bin")  # type: ignore[arg-type]


def test_empty_job_folders_are_removed_after_delete(tmp_path):
    store = make_store(tmp_path)
    store.put("inputs/job1/a.bin", b"a")
    store.put("inputs/job1/b.bin", b"b")
    store.put("inputs/job2/c.bin", b"c")

    store.delete("inputs/job1/a.bin")
    assert (store.root / "inputs" / "job1").is_dir()  # still holds b.bin

    store.delete("inputs/job1/b.bin")
    assert not (store.root / "inputs" / "job1").exists()
    assert (store.root / "inputs" / "job2" / "c.bin").is_file()
    assert store.root.is_dir() and (store.root / ".tmp").is_dir()


def test_list_keys_filters_by_prefix_and_skips_temporary_files(tmp_path):
    store = make_store(tmp_path)
    store.put("inputs/job1/a.bin", b"a")
    store.put("inputs/job2/b.bin", b"b")
    store.put("face/job1/e.bin", b"e")
    (store.root / ".tmp" / "partial-write").write_bytes(b"half")

    assert store.list_keys("inputs/") == ["inputs/job1/a.bin", "inputs/job2/b.bin"]
    assert store.list_keys("face/") == ["face/job1/e.bin"]
    assert all(not k.startswith(".tmp") for k in store.list_keys(""))
    assert len(store.list_keys("")) == 3


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../outside.bin", "inputs/../../x",
                                 ".tmp/partial"])
def test_invalid_keys_are_refused(tmp_path, key):
    store = make_store(tmp_path)
    with pytest.raises(StorageError):
        store.put(key, b"x")
    assert not (tmp_path / "outside.bin").exists()


def test_uri_round_trips_through_key_from_uri(tmp_path):
    store = make_store(tmp_path)
    key = input_key("job1", "obj1")

    uri = object_uri(store, key)

    assert uri.startswith("file://")
    assert key_from_uri(store, uri) == key


@pytest.mark.parametrize("suffix", ["inputs/../../etc/passwd", "inputs/job1/../../x"])
def test_key_from_uri_refuses_dot_dot(tmp_path, suffix):
    store = make_store(tmp_path)
    with pytest.raises(StorageError):
        key_from_uri(store, f"{store.url}/{suffix}")


def test_key_from_uri_refuses_another_stores_uri(tmp_path):
    store = make_store(tmp_path)
    other = LocalObjectStore(f"file://{tmp_path / 'store2'}")  # shares a name prefix
    with pytest.raises(StorageError):
        key_from_uri(store, object_uri(other, "inputs/job1/a.bin"))
    with pytest.raises(StorageError):
        key_from_uri(store, "s3://bucket/inputs/job1/a.bin")


def test_output_key_hides_the_account_id():
    key = output_key("alice-personal@example", "out1", "png")

    assert "alice" not in key
    assert key == f"outputs/{account_digest('alice-personal@example')}/out1.png"
    assert account_digest("alice") == account_digest("alice")
    assert account_digest("alice") != account_digest("bob")


def test_open_store_refuses_unknown_schemes(tmp_path):
    assert isinstance(open_store(f"file://{tmp_path}"), LocalObjectStore)
    with pytest.raises(ValueError, match="storage.yaml"):
        open_store("s3://bucket")


def test_a_missing_local_store_is_an_error_never_absent_or_empty(tmp_path):
    """An unmounted store must not read as 'object not found', 'gone' or 'nothing here':
    a deletion would be verified and orphans hidden while the store is down."""
    from pipeline.core.errors import StorageError
    from pipeline.storage.base import LocalObjectStore, delete_verified

    root = tmp_path / "store"
    store = LocalObjectStore(f"file://{root}")
    store.put("inputs/j/a.bin", b"x")
    root.rename(tmp_path / "parked")
    root.write_bytes(b"")  # the mount is gone
    for call in (lambda: store.get("inputs/j/a.bin"), lambda: store.exists("inputs/j/a.bin"),
                 lambda: store.list_keys("inputs/"),
                 lambda: delete_verified(store, "inputs/j/a.bin")):
        with pytest.raises(StorageError):
            call()
