"""The model store on the local backend: staging writes a manifest, fetching verifies
every file into a cache once, and any mismatch is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import StorageConfig
from pipeline.models.model_store import (
    MANIFEST,
    Manifest,
    ModelStoreError,
    fetch_model,
    resolve_model,
    stage_model,
)
from serve.cli import main as cli

pytestmark = pytest.mark.models
STORAGE = StorageConfig()


def make_model(root: Path) -> Path:
    """A save_pretrained-shaped folder: nested files, a config and weights."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 32}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 40)
    return root


def test_stage_then_fetch_gives_the_same_files_and_a_stable_hash(tmp_path):
    src = make_model(tmp_path / "src")
    manifest = stage_model(src, str(tmp_path / "store" / "sd"), STORAGE)
    assert {f.path for f in manifest.files} == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    stored = Manifest.from_json((tmp_path / "store" / "sd" / MANIFEST).read_bytes())
    assert stored.sha256 == manifest.sha256

    local = fetch_model(str(tmp_path / "store" / "sd"), tmp_path / "cache", STORAGE,
                        expected_sha256=manifest.sha256)
    for f in manifest.files:
        assert (local / f.path).read_bytes() == (src / f.path).read_bytes()


def test_a_second_fetch_reads_nothing_from_the_store(tmp_path, monkeypatch):
    from pipeline.storage.base import LocalObjectStore

    src = make_model(tmp_path / "src")
    stage_model(src, str(tmp_path / "store"), STORAGE)
    first = fetch_model(str(tmp_path / "store"), tmp_path / "cache", STORAGE)
    reads: list[str] = []
    original = LocalObjectStore.get
    monkeypatch.setattr(LocalObjectStore, "get",
                        lambda self, key, **kw: reads.append(key) or original(self, key, **kw))
    assert fetch_model(str(tmp_path / "store"), tmp_path / "cache", STORAGE) == first
    assert reads == [MANIFEST]  # only the manifest, to learn which cached copy is meant


def test_a_changed_weight_file_is_refused_naming_it(tmp_path):
    src = make_model(tmp_path / "src")
    stage_model(src, str(tmp_path / "store"), STORAGE)
    weights = tmp_path / "store" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"tampered" + weights.read_bytes()[8:])
    with pytest.raises(ModelStoreError, match="unet/diffusion_pytorch_model.safetensors"):
        fetch_model(str(tmp_path / "store"), tmp_path / "cache", STORAGE)
    assert not any((tmp_path / "cache").glob("*/unet"))  # nothing half-fetched is kept


def test_a_model_other_than_the_pinned_one_is_refused(tmp_path):
    stage_model(make_model(tmp_path / "src"), str(tmp_path / "store"), STORAGE)
    with pytest.raises(ModelStoreError, match="models.yaml expects " + "0" * 64):
        fetch_model(str(tmp_path / "store"), tmp_path / "cache", STORAGE,
                    expected_sha256="0" * 64)


def test_a_missing_manifest_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelStoreError, match="ephemera models stage"):
        fetch_model(str(tmp_path / "empty"), tmp_path / "cache", STORAGE)
    stage_model(make_model(tmp_path / "src"), str(tmp_path / "store"), STORAGE)
    (tmp_path / "store" / "unet" / "config.json").unlink()
    with pytest.raises(ModelStoreError, match="unet/config.json is listed"):
        fetch_model(str(tmp_path / "store"), tmp_path / "cache", STORAGE)


def test_a_single_file_model_fetches_to_that_file(tmp_path):
    weights = tmp_path / "ip-adapter-faceid_sd15.bin"
    weights.write_bytes(b"\x00weights" * 100)
    stage_model(weights, str(tmp_path / "store" / "adapter"), STORAGE)
    local = fetch_model(str(tmp_path / "store" / "adapter"), tmp_path / "cache", STORAGE)
    assert local.name == weights.name and local.read_bytes() == weights.read_bytes()


def test_a_plain_folder_loads_as_before_and_a_pin_without_manifest_is_refused(tmp_path):
    plain = make_model(tmp_path / "plain")
    assert resolve_model(str(plain), sha256=None, cache_dir=str(tmp_path / "c"),
                             storage=STORAGE) == plain
    with pytest.raises(ModelStoreError, match="has no manifest.json"):
        resolve_model(str(plain), sha256="a" * 64, cache_dir=str(tmp_path / "c"),
                          storage=STORAGE)


def test_cli_stage_prints_the_hash_to_pin_and_fetch_refuses_a_wrong_one(tmp_path, capsys):
    src = make_model(tmp_path / "src")
    assert cli(["models", "stage", str(src), str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    digest = out.split("manifest sha256: ")[1].split()[0]
    assert len(digest) == 64
    assert cli(["models", "fetch", str(tmp_path / "store"), "--sha256", "f" * 64]) == 1
    assert "expects" in capsys.readouterr().err
    assert cli(["models", "stage", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
