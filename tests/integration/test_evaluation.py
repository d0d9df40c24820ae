"""`ephemera eval` end to end: the sample manifest (scripts/make_eval_manifest.py: real
photos from scikit-image) through Ray Data's actor pools with the service's stage code and
the tiny models, as an operator runs it (its own process, its own local Ray); and the
refusal of a manifest that names images in the production input buckets.

The tiny random-weight models make the similarity itself meaningless: these tests check
the plumbing (one row per image, the service's failure reason, similarities in [-1, 1],
one per output, time charged to every image); tests/unit/test_evaluation.py checks the
metric's math on known vectors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.config import APP_ROOT, CONFIG_DIR
from pipeline.jobs.evaluation import RESULT_SCHEMA, manifest_table
from pipeline.jobs.stages import face_failure_reason
from scripts.make_eval_manifest import NO_FACE_ID, write_sample
from serve.cli import main
from tests.unit.factories import pinned_production_configs

pytestmark = pytest.mark.integration

EVAL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def eval_configs(tmp_path_factory, pinned_models) -> Path:
    """The shipped configs with the tiny models staged and pinned, and the local store
    in a temporary folder."""
    root = tmp_path_factory.mktemp("eval")
    configs = root / "configs"
    configs.mkdir()
    for path in CONFIG_DIR.glob("*.yaml"):
        (configs / path.name).write_text(path.read_text())
    models = yaml.safe_load((configs / "models.yaml").read_text())
    models.update(pinned_models, model_cache_dir=str(root / "model-cache"),
                  num_inference_steps=4)
    (configs / "models.yaml").write_text(yaml.safe_dump(models))
    storage = yaml.safe_load((configs / "storage.yaml").read_text())
    storage["local_root"] = str(root / "store")
    (configs / "storage.yaml").write_text(yaml.safe_dump(storage))
    return configs


def test_eval_runs_the_sample_manifest_end_to_end(tmp_path, eval_configs):
    manifest = write_sample(tmp_path / "sample")
    out = tmp_path / "results.parquet"
    run = subprocess.run(
        [sys.executable, "-m", "serve.cli", "eval", str(manifest), "--out", str(out),
         "--config-dir", str(eval_configs)],
        cwd=APP_ROOT, capture_output=True, text=True, timeout=EVAL_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "failure rate 20.0%" in run.stdout
    assert "images/s per CPU worker (no GPU; actors: face 1, diffusion 1, scoring 1)" \
        in run.stdout

    results = pq.read_table(out)
    assert results.schema.equals(RESULT_SCHEMA)
    rows = results.to_pylist()
    expected = pq.read_table(manifest).to_pylist()
    assert [r["image_id"] for r in rows] == [m["image_id"] for m in expected]
    for row, asked in zip(rows, expected, strict=True):
        assert (row["kind"], row["style"], row["num_outputs"]) == \
            (asked["kind"], asked["style"], asked["num_outputs"])
        assert row["seconds"] > 0
        if row["image_id"] == NO_FACE_ID:
            assert row["failure_reason"] == face_failure_reason(1, None)  # the service's words
            assert row["identity_similarities"] == [] and row["identity_similarity_mean"] is None
            continue
        assert row["failure_reason"] is None, row
        sims = row["identity_similarities"]
        assert len(sims) == row["num_outputs"]
        assert all(-1.0 <= s <= 1.0 for s in sims)
        assert row["identity_similarity_min"] == min(sims)
        assert row["identity_similarity_mean"] == pytest.approx(sum(sims) / len(sims))
    astronaut = rows[0]
    assert astronaut["num_outputs"] == 2 and len(set(astronaut["identity_similarities"])) == 2


def test_eval_refuses_images_in_the_production_input_buckets(tmp_path, capsys):
    configs = pinned_production_configs(tmp_path)
    manifest = tmp_path / "manifest.parquet"
    table = manifest_table([])
    rows = [{"image_id": "leak", "kind": "ai_photo", "style": "portrait",
             "image_uri": "gs://ephemera-inputs-euw1/inputs/job1/object.bin"}]
    pq.write_table(table.from_pylist(rows, schema=table.schema), manifest)
    out = tmp_path / "results.parquet"
    assert main(["eval", str(manifest), "--out", str(out), "--config-dir", str(configs)]) == 2
    error = capsys.readouterr().err
    assert "lies in ephemera-inputs-euw1, a production input bucket" in error
    assert "operator-owned test images only" in error
    assert not out.exists()


def test_eval_refuses_images_in_the_local_input_store(tmp_path, eval_configs, capsys):
    store = Path(yaml.safe_load((eval_configs / "storage.yaml").read_text())["local_root"])
    upload = store / "inputs" / "job1" / "object.bin"
    manifest = tmp_path / "manifest.parquet"
    table = manifest_table([])
    rows = [{"image_id": "leak", "kind": "art_style", "style": "watercolor",
             "image_uri": f"file://{upload}"}]
    pq.write_table(table.from_pylist(rows, schema=table.schema), manifest)
    out = tmp_path / "results.parquet"
    assert main(["eval", str(manifest), "--out", str(out),
                 "--config-dir", str(eval_configs)]) == 2
    error = capsys.readouterr().err
    assert f"lies in {store.resolve()}, the production input store" in error
    assert not out.exists()
