"""runtime.select_runtime: auto settings resolve per host; impossible combinations are refused."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ModelsConfig
from pipeline.models.runtime import Runtime, select_runtime


def pick(*, cuda: bool, xformers: bool, **models: str) -> Runtime:
    return select_runtime(ModelsConfig(**models), cuda_available=cuda,  # type: ignore[arg-type]
                          xformers_installed=xformers)


@pytest.mark.parametrize(("cuda", "xformers", "expected"), [
    (False, False, Runtime("cpu", torch.float32, "sdpa")),
    (False, True, Runtime("cpu", torch.float32, "sdpa")),
    (True, True, Runtime("cuda", torch.float16, "xformers")),
    (True, False, Runtime("cuda", torch.float16, "sdpa")),
])
def test_auto_resolves_per_host(cuda, xformers, expected):
    assert pick(cuda=cuda, xformers=xformers) == expected


def test_explicit_choices_are_kept():
    assert pick(cuda=True, xformers=True, device="cpu") == Runtime("cpu", torch.float32, "sdpa")
    assert pick(cuda=True, xformers=True, attention="sdpa").attention == "sdpa"
    assert pick(cuda=False, xformers=False, dtype="bfloat16").dtype == torch.bfloat16
    assert pick(cuda=True, xformers=False, dtype="float32").dtype == torch.float32


@pytest.mark.parametrize(("cuda", "xformers", "models", "field"), [
    (False, False, {"dtype": "float16"}, "dtype"),
    (True, True, {"device": "cpu", "dtype": "float16"}, "dtype"),
    (False, False, {"device": "cuda"}, "device"),
    (False, True, {"attention": "xformers"}, "attention"),
    (True, False, {"attention": "xformers"}, "attention"),
])
def test_impossible_combinations_are_refused_naming_the_setting(cuda, xformers, models, field):
    with pytest.raises(ValueError, match=f"models.yaml {field}"):
        pick(cuda=cuda, xformers=xformers, **models)
