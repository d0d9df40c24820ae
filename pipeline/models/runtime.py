"""Where and how models run: device, dtype and attention backend, chosen from config and
detected at run time. The same code runs tiny models on CPU and full-size ones on a GPU."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from pipeline.core.config import ModelsConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Runtime:
    device: str  # "cpu" | "cuda"
    dtype: torch.dtype
    attention: str  # "sdpa" | "xformers"
    channels_last: bool = False
    compile: bool = False


def select_runtime(cfg: ModelsConfig, *, cuda_available: bool | None = None,
                   xformers_installed: bool | None = None) -> Runtime:
    """Resolve the ``auto`` settings; refuse combinations that cannot run."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    has_xformers = (
        importlib.util.find_spec("xformers") is not None
        if xformers_installed is None
        else xformers_installed
    )
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not cuda:
        raise ValueError("models.yaml device: cuda, but no CUDA GPU is visible; use auto or cpu")
    if cfg.dtype == "auto":
        dtype = torch.float16 if device == "cuda" else torch.float32
    else:
        dtype = _DTYPES[cfg.dtype]
    if device == "cpu" and dtype == torch.float16:
        raise ValueError("models.yaml dtype: float16 needs a GPU; use auto or float32 on cpu")
    if cfg.attention == "xformers":
        if device != "cuda" or not has_xformers:
            raise ValueError(
                "models.yaml attention: xformers needs CUDA and the 'gpu' extra installed; "
                "use auto or sdpa"
            )
        attention = "xformers"
    elif cfg.attention == "auto":
        attention = "xformers" if (device == "cuda" and has_xformers) else "sdpa"
    else:
        attention = "sdpa"
    return Runtime(device=device, dtype=dtype, attention=attention,
                   channels_last=cfg.channels_last, compile=cfg.torch_compile)
