"""Where and how models run: device, dtype and attention backend, chosen from config and
detected at run time. The same code runs tiny models on CPU and full-size ones on a GPU.

``select_runtime`` says what should be applied; ``observe_pipeline`` reads back what a
loaded pipeline actually runs with (attention processors, compiled UNet, memory format),
so tests and operators check the effect, not the config echoed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class ObservedRuntime:
    """What a loaded diffusers pipeline runs with, read from its modules (read-only)."""

    attention: frozenset[str]  # backends of the UNet's attention processors (see below)
    compiled: bool  # the UNet is a torch.compile OptimizedModule (``_orig_mod`` inside)
    unet_channels_last: bool  # every 4-D UNet weight is channels-last in memory
    vae_channels_last: bool
    device: str  # "cpu" | "cuda", of the UNet's weights
    dtype: torch.dtype


def attention_backend(processor: object) -> str:
    """"xformers", "sdpa" (torch's scaled_dot_product_attention: diffusers' ``*2_0``
    processors, IP-Adapter's included), or the class name of anything else (e.g. the eager
    ``AttnProcessor``), so an unexpected backend shows up by name."""
    name = type(processor).__name__
    if "XFormers" in name:
        return "xformers"
    if name.endswith("2_0"):
        return "sdpa"
    return name


def _channels_last(module: torch.nn.Module) -> bool:
    weights = [p for p in module.parameters() if p.ndim == 4]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last)
                                 for w in weights)


def observe_pipeline(pipe: Any) -> ObservedRuntime:
    """Read back the runtime a loaded pipeline (anything with ``.unet`` and ``.vae``)
    actually uses. Changes nothing."""
    unet = pipe.unet
    compiled = isinstance(unet, torch._dynamo.eval_frame.OptimizedModule)
    module = unet._orig_mod if compiled else unet
    first = next(module.parameters())
    return ObservedRuntime(
        attention=frozenset(attention_backend(p) for p in module.attn_processors.values()),
        compiled=compiled, unet_channels_last=_channels_last(module),
        vae_channels_last=_channels_last(pipe.vae), device=first.device.type,
        dtype=first.dtype)
