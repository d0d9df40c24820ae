"""config: the shipped YAML loads; typos and out-of-range values stop start-up naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from pipeline.core import config
from pipeline.core.config import (
    CONFIG_DIR,
    MODEL_PINS,
    ModelsConfig,
    RetentionConfig,
    ServiceConfig,
    Settings,
    load_settings,
    resolve_path,
)
from serve.cli import main
from tests.unit.factories import fake_pins, pinned_production_configs

CONFIG_MODELS = [
    config.ServiceConfig, config.StageBatchConfig, config.BatchingConfig,
    config.PoolConfig, config.AutoscalingConfig, config.DeploymentsConfig,
    config.ModelsConfig, config.StyleConfig,
    config.StylesConfig, config.RetentionConfig, config.Settings, config.S3Config,
    config.GcsConfig, config.StorageConfig, config.TransparencyConfig,
]


def config_dir_with(tmp_path: Path, file_name: str, **changes: object) -> Path:
    """A copy of configs/ where ``file_name`` has ``changes`` applied to its top level."""
    target = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, target)
    path = target / file_name
    values = yaml.safe_load(path.read_text()) or {}
    values.update(changes)
    path.write_text(yaml.safe_dump(values))
    return target


def test_shipped_configs_load():
    settings = load_settings()

    assert settings.service.default_resolution_px in settings.service.allowed_resolutions_px
    assert settings.styles.styles  # at least one style
    assert settings.retention.input_ceiling_h <= 96
    assert settings.batching.max_attempts >= 1
    assert settings.models.diffusion_model_dir


def test_unknown_key_is_refused_naming_the_field_and_file(tmp_path):
    root = config_dir_with(tmp_path, "batching.yaml", max_atempts=5)

    with pytest.raises(ValueError, match="max_atempts") as info:
        load_settings(root)
    assert "batching.yaml" in str(info.value)


def test_unknown_nested_key_is_refused(tmp_path):
    root = config_dir_with(tmp_path, "styles.yaml", styles={"comic": {"prompt": "x", "strenght": 1}})

    with pytest.raises(ValueError, match="strenght"):
        load_settings(root)


@pytest.mark.parametrize(("file_name", "field", "value"), [
    ("batching.yaml", "max_attempts", 0),
    ("batching.yaml", "stage_timeout_s", 5000),
    ("service.yaml", "max_file_bytes", -1),
    ("service.yaml", "http_port", 70000),
    ("models.yaml", "face_min_probability", 1.5),
    ("models.yaml", "num_inference_steps", 0),
    ("retention.yaml", "lease_s", 0),
])
def test_out_of_bounds_number_is_refused(tmp_path, file_name, field, value):
    root = config_dir_with(tmp_path, file_name, **{field: value})

    with pytest.raises(ValueError, match=field):
        load_settings(root)


def test_default_resolution_must_be_an_allowed_one():
    with pytest.raises(ValidationError, match="default_resolution_px"):
        ServiceConfig(allowed_resolutions_px=[64, 128], default_resolution_px=96)
    assert ServiceConfig(allowed_resolutions_px=[64, 128], default_resolution_px=128)


@pytest.mark.parametrize("field", ["input_ceiling_h", "face_data_ceiling_h"])
def test_retention_ceiling_above_96_hours_is_refused(tmp_path, field):
    assert RetentionConfig(**{field: 96}).model_dump()[field] == 96
    root = config_dir_with(tmp_path, "retention.yaml", **{field: 96.5})

    with pytest.raises(ValueError, match=field):
        load_settings(root)


def test_missing_file_is_named(tmp_path):
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, root)
    (root / "models.yaml").unlink()

    with pytest.raises(ValueError, match="models.yaml"):
        load_settings(root)


def test_configs_are_frozen():
    cfg = ModelsConfig()
    with pytest.raises(ValidationError):
        cfg.num_inference_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described_and_every_number_bounded(model: type[BaseModel]):
    for name, info in model.model_fields.items():
        assert info.description, f"{model.__name__}.{name} has no description"
        if info.annotation in (int, float):
            bounds = [m for m in info.metadata
                      if any(hasattr(m, b) for b in ("gt", "ge", "lt", "le"))]
            assert bounds, f"{model.__name__}.{name} has no bounds"


@pytest.mark.parametrize("sizes", [[64, 0], [64, -64]])
def test_allowed_resolutions_must_be_positive(sizes):
    with pytest.raises(ValidationError, match="allowed_resolutions_px"):
        ServiceConfig(allowed_resolutions_px=sizes, default_resolution_px=64)


def test_resolve_path_is_relative_to_the_repository():
    assert resolve_path("models/tiny-sd") == CONFIG_DIR.parent / "models" / "tiny-sd"
    assert resolve_path("/abs/weights.pt") == Path("/abs/weights.pt")


def test_literal_choices_are_enforced():
    with pytest.raises(ValidationError, match="device"):
        ModelsConfig(device="tpu")  # type: ignore[arg-type]


def test_timeouts_must_fit_the_retention_ceiling_and_the_attempts():
    base = load_settings()
    with pytest.raises(ValidationError, match="job_timeout_s"):
        Settings(**{**base.model_dump(), "service": {**base.service.model_dump(),
                                                     "job_timeout_s": 86400},
                    "retention": {**base.retention.model_dump(), "input_ceiling_h": 1}})
    with pytest.raises(ValidationError, match="stage_timeout_s"):
        Settings(**{**base.model_dump(), "batching": {**base.batching.model_dump(),
                                                      "stage_timeout_s": 600}})


def test_the_simulated_gpu_is_refused_in_a_production_config():
    """The GPU stand-in is a benchmark tool: the production config set refuses it."""
    root = CONFIG_DIR / "production"
    models = yaml.safe_load((root / "models.yaml").read_text())
    settings = load_settings(root, require_pins=False)
    with pytest.raises(ValueError, match="simulated is a benchmark tool"):
        Settings(**{**settings.model_dump(), "models": {**models, "diffusion_backend": "simulated"}})
    # The embedded default (loopback, local stores, no token) may use it for benchmarks.
    base = load_settings()
    Settings(**{**base.model_dump(), "models": {**base.models.model_dump(),
                                                "diffusion_backend": "simulated"}})


def test_simulated_gpu_time_follows_its_cost_model():
    from pipeline.core.config import SimulatedGpuConfig
    from pipeline.models.simulated import SimulatedGenerator

    gpu = SimulatedGenerator(SimulatedGpuConfig(overhead_s=0.25, s_per_unit=1.35),
                             reference_resolution_px=512)
    assert gpu.batch_time_s(1, 512) == pytest.approx(1.6)
    assert gpu.batch_time_s(8, 512) == pytest.approx(0.25 + 8 * 1.35)
    assert gpu.batch_time_s(1, 1024) == pytest.approx(0.25 + 4 * 1.35)


def test_a_batch_limit_below_the_largest_job_is_refused(tmp_path):
    """A job costing more than max_batch_cost could never run: refused at start."""
    root = config_dir_with(tmp_path, "batching.yaml",
                           diffusion={"max_batch_cost": 2, "max_wait_ms": 100})
    with pytest.raises(ValueError, match="diffusion.max_batch_cost 2 is below"):
        load_settings(root)


@pytest.mark.parametrize("service", [
    {"http_host": "0.0.0.0"},
    {"ray_address": "auto"},
])
def test_the_service_never_runs_open_beyond_loopback(service):
    from pipeline.core.config import ServiceConfig, Settings, StyleConfig, StylesConfig

    styles = StylesConfig(styles={"p": StyleConfig(prompt="p")})
    with pytest.raises(ValueError, match="api_token_env must name"):
        Settings(service=ServiceConfig(**service), styles=styles)
    Settings(service=ServiceConfig(**service, api_token_env="EPHEMERA_API_TOKEN"), styles=styles,
             models=ModelsConfig(**fake_pins()))  # production-shaped: pinned models only


def test_production_refuses_to_start_with_any_model_unpinned(capsys):
    """configs/production ships its pins null (a hash exists only once the real weights
    are staged): loading it as the service does names all four and how to get them."""
    with pytest.raises(ValueError) as refused:
        load_settings(CONFIG_DIR / "production")
    message = str(refused.value)
    for location, pin in MODEL_PINS.items():
        assert f"{pin} (for {location} s3://ephemera-models-us/" in message
    assert "ephemera models stage SRC DEST" in message and "manifest sha256" in message
    assert main(["config", "check", "--config-dir", "configs/production"]) == 2
    assert "unpinned" in capsys.readouterr().err


def test_production_with_its_pins_loads(tmp_path, capsys):
    root = pinned_production_configs(tmp_path)
    settings = load_settings(root)
    assert {getattr(settings.models, pin) for pin in MODEL_PINS.values()} == \
        set(fake_pins().values())
    assert main(["config", "check", "--config-dir", str(root)]) == 0
    assert "configs OK" in capsys.readouterr().out


@pytest.mark.parametrize("pin", list(MODEL_PINS.values()))
def test_one_missing_pin_is_named_alone(tmp_path, pin):
    root = pinned_production_configs(tmp_path)
    models = root / "models.yaml"
    models.write_text(models.read_text().replace(f"{pin}: {fake_pins()[pin]}", f"{pin}: null"))
    with pytest.raises(ValueError, match="leaves 1 model") as refused:
        load_settings(root)
    assert pin in str(refused.value)
    assert all(other not in str(refused.value) for other in MODEL_PINS.values() if other != pin)


def test_pins_are_required_only_where_real_models_serve_a_production_config():
    load_settings()  # the loopback demo: tiny models built on first use, no pins
    production = load_settings(CONFIG_DIR / "production", require_pins=False)
    assert production.models.diffusion_model_sha256 is None  # deploy-config, status, staging
    with pytest.raises(ValueError, match="unpinned"):  # re-validated as the app does
        Settings.model_validate(production.model_dump())


def test_every_model_the_loaders_open_has_its_pin():
    from pipeline.models.loading import Model

    assert {m.value for m in Model} == set(MODEL_PINS)
    assert set(MODEL_PINS.values()) <= set(ModelsConfig.model_fields)


def test_joining_a_cluster_needs_ray_token_auth(monkeypatch):
    from serve.launcher import require_ray_token_auth

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ValueError, match="RAY_AUTH_MODE=token"):
        require_ray_token_auth()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ValueError):
        require_ray_token_auth()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    require_ray_token_auth()
