"""`ephemera tune --write FILE`: the change a live tune makes, made in the Serve config or
RayService manifest the cluster is deployed from and in the batching.yaml it is generated
from; only the changed lines, comments kept; `--dry-run` prints the diff and changes
nothing; a bad value or a file it cannot edit leaves every file byte-identical. Run on
copies of the shipped files; no Ray cluster is started."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_settings
from serve.app import serve_config
from serve.cli import main
from serve.config_file import edit_mapping

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def deployed(tmp_path, monkeypatch):
    """Copies of configs/production and the RayService manifest, whose apps name the copy
    of the config set; any Ray connection fails the test."""
    configs = tmp_path / "production"
    shutil.copytree(ROOT / "configs" / "production", configs)
    for path in (configs / "serve.yaml", tmp_path / "rayservice.yaml"):
        source = ROOT / "configs" / ("deploy" if path.name == "rayservice.yaml" else
                                     "production") / path.name
        text = source.read_text()
        assert "config_dir: configs/production" in text
        path.write_text(text.replace("config_dir: configs/production",
                                     f"config_dir: {configs}"))

    def no_ray(args):
        raise AssertionError("connected to Ray")

    monkeypatch.setattr("serve.cli._connect", no_ray)
    monkeypatch.chdir(tmp_path)
    return configs


def texts(*paths: Path) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def diffusion(config: dict) -> dict:
    app = config["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "DiffusionDeployment")


def test_dry_run_prints_the_diff_and_changes_nothing(deployed, capsys):
    files = [deployed / "serve.yaml", deployed / "batching.yaml"]
    before = texts(*files)
    argv = ["tune", "diffusion", "--max-batch-cost", "24", "--write", "production/serve.yaml",
            "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert texts(*files) == before
    assert out.startswith("--- a/production/serve.yaml\n+++ b/production/serve.yaml\n")
    changed = [line for line in out.splitlines()
               if line[:1] in "+-" and not line.startswith(("---", "+++"))]
    assert changed == ["-    max_ongoing_requests: 32", "+    max_ongoing_requests: 48",
                       "-      max_batch_cost: 16", "+      max_batch_cost: 24",
                       "-  max_batch_cost: 16", "+  max_batch_cost: 24"]
    assert "--- a/production/batching.yaml" in out


def test_file_only_writes_what_deploy_config_would_generate_keeping_comments(deployed, capsys):
    """The written Serve config is what `ephemera deploy-config` makes from the written
    batching.yaml: the next regeneration keeps the tune instead of reverting it."""
    serve_file, batching = deployed / "serve.yaml", deployed / "batching.yaml"
    comments = [line for p in (serve_file, batching) for line in p.read_text().splitlines()
                if line.lstrip().startswith("#") or " # " in line]
    assert main(["tune", "diffusion", "--max-batch-cost", "24", "--max-wait-ms", "80",
                 "--write", str(serve_file), "--file-only"]) == 0
    assert "wrote" in capsys.readouterr().out
    written = yaml.safe_load(serve_file.read_text())
    assert diffusion(written)["user_config"] == {"max_batch_cost": 24, "max_wait_ms": 80.0,
                                                 "max_concurrent_batches": 1}
    assert diffusion(written)["max_ongoing_requests"] == 48
    settings = load_settings(deployed, require_pins=False)
    assert settings.batching.diffusion.max_batch_cost == 24
    assert written == serve_config(settings, args=written["applications"][0]["args"])
    after = [line for p in (serve_file, batching) for line in p.read_text().splitlines()]
    assert all(line in after for line in comments)
    # The runner's policy lives at the top of batching.yaml.
    assert main(["tune", "runner", "--max-attempts", "4", "--write", str(serve_file),
                 "--file-only"]) == 0
    assert load_settings(deployed, require_pins=False).batching.max_attempts == 4
    assert yaml.safe_load(serve_file.read_text()) == serve_config(
        load_settings(deployed, require_pins=False), args=written["applications"][0]["args"])


def test_the_serve_config_and_the_rayservice_stay_equal(deployed):
    """tests/unit/test_deploy_files.py requires serveConfigV2 == configs/production/
    serve.yaml; tuning both with the same change keeps it so, and the rest of the manifest
    (its comments included) is untouched."""
    manifest = deployed.parent / "rayservice.yaml"
    before = manifest.read_text()
    for path in (deployed / "serve.yaml", manifest):
        assert main(["tune", "face", "--max-wait-ms", "20", "--max-concurrent-batches", "2",
                     "--write", str(path), "--file-only"]) == 0
    embedded = yaml.safe_load(yaml.safe_load(manifest.read_text())["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((deployed / "serve.yaml").read_text())
    face = next(d for d in embedded["applications"][0]["deployments"]
                if d["name"] == "FaceDeployment")
    assert face["user_config"]["max_concurrent_batches"] == 2
    assert face["max_ongoing_requests"] == 16 * 3
    changed = [(a, b) for a, b in zip(before.splitlines(), manifest.read_text().splitlines(),
                                      strict=True) if a != b]
    assert changed == [("        max_ongoing_requests: 32", "        max_ongoing_requests: 48"),
                       ("          max_wait_ms: 50.0", "          max_wait_ms: 20.0"),
                       ("          max_concurrent_batches: 1",
                        "          max_concurrent_batches: 2")]


@pytest.mark.parametrize(("argv", "message"), [
    (["diffusion", "--max-batch-cost", "1"], "could no longer run every job"),
    (["face", "--max-concurrent-batches", "99"], "max_concurrent_batches"),
    (["runner", "--max-attempts", "0"], "max_attempts"),
])
@pytest.mark.parametrize("target", ["production/serve.yaml", "rayservice.yaml"])
@pytest.mark.parametrize("mode", ["--dry-run", "--file-only", None])
def test_a_bad_value_is_refused_and_leaves_every_file_byte_identical(
        deployed, capsys, argv, message, target, mode):
    files = [deployed.parent / target, deployed / "batching.yaml"]
    before = texts(*files)
    assert main(["tune", *argv, "--write", target, *([mode] if mode else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("ephemera: ")
    assert texts(*files) == before


def test_a_file_in_a_layout_it_cannot_edit_is_refused_untouched(deployed, capsys):
    flow = deployed / "serve.yaml"
    flow.write_text(yaml.safe_dump(yaml.safe_load(flow.read_text()), default_flow_style=True))
    before = texts(flow, deployed / "batching.yaml")
    assert main(["tune", "face", "--max-wait-ms", "20", "--write", str(flow), "--file-only"]) == 2
    assert "edit the file by hand" in capsys.readouterr().err
    assert texts(flow, deployed / "batching.yaml") == before


def test_write_applies_live_first_and_writes_only_once_that_worked(deployed, monkeypatch, capsys):
    calls: list[tuple] = []
    monkeypatch.setattr("serve.cli._connect", lambda args: calls.append(("connect",)))

    def retune(pool, changes):
        calls.append((pool, changes))
        raise RuntimeError("the Serve app failed to deploy")

    monkeypatch.setattr("serve.tuning.retune", retune)
    serve_file = deployed / "serve.yaml"
    before = texts(serve_file, deployed / "batching.yaml")
    with pytest.raises(RuntimeError):
        main(["tune", "diffusion", "--max-wait-ms", "70", "--write", str(serve_file)])
    assert calls == [("connect",), ("diffusion", {"max_wait_ms": 70.0})]
    assert texts(serve_file, deployed / "batching.yaml") == before
    live = {"max_batch_cost": 16, "max_wait_ms": 70.0, "max_concurrent_batches": 1}
    monkeypatch.setattr("serve.tuning.retune", lambda pool, changes: live)
    assert main(["tune", "diffusion", "--max-wait-ms", "70", "--write", str(serve_file)]) == 0
    assert diffusion(yaml.safe_load(serve_file.read_text()))["user_config"] == live
    assert load_settings(deployed, require_pins=False).batching.diffusion.max_wait_ms == 70
    assert "warning" not in capsys.readouterr().err
    # The running pool was tuned before without --write: the file and the cluster differ.
    live = {**live, "max_concurrent_batches": 2}
    assert main(["tune", "diffusion", "--max-wait-ms", "60", "--write", str(serve_file)]) == 0
    assert "tuned without --write" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--dry-run"], "give it with --write FILE"), (["--file-only"], "give it with --write FILE"),
    (["--write", "x.yaml", "--dry-run", "--file-only"], "give one")])
def test_dry_run_and_file_only_need_a_file_and_exclude_each_other(argv, message, capsys):
    assert main(["tune", "face", "--max-wait-ms", "20", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_edit_keeps_the_comment_column_and_adds_a_missing_key():
    text = "a: 1\nb:\n  c: 120        # note\ne: {f: 1, g: 2}  # flow\n"
    assert edit_mapping(text, {"b": {"c": 100.0, "h": 3}, "e": {"g": 9}}, "t") == \
        "a: 1\nb:\n  c: 100.0      # note\n  h: 3\ne: {f: 1, g: 9}  # flow\n"
