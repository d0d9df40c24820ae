"""Tiny random-weight models of the real architectures and file layouts: for the embedded
default config (``build_tiny_if_missing: true``), the tests and the demo; never production.

* ``build_tiny_models``: a Stable-Diffusion ``save_pretrained`` folder (UNet, VAE, CLIP text
  encoder with a character-level CLIPTokenizer, DDIM scheduler) at the sizes diffusers' own
  tests use;
* ``build_tiny_ip_adapter``: an IP-Adapter-FaceID safetensors file in the published key
  layout (``diffusion.ip_adapter_layout``) for that UNet;
* ``build_tiny_motion_adapter``: an AnimateDiff ``MotionAdapter`` folder matching that UNet;
* ``build_tiny_arcface``: an ONNX graph with ArcFace's contract ((N, 3, 112, 112) in,
  (N, 512) out), as InsightFace's trained graphs ship in no package;
* ``stage_tiny_models``: all four staged into a model store and pinned, for a
  production-shaped test or rehearsal config (which refuses unpinned models).

All weights are random and seeded (``seed``), so every build is the same; their pictures
are noise. Production code never imports this module, except ``pipeline.models.loading``,
which builds them where models.yaml allows it and the configured weights are absent.
The diffusers imports stay inside the diffusion builders, so a face replica building its
tiny ArcFace never imports diffusers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import MODEL_PINS, StorageConfig
from pipeline.models.faces import ALIGNED_SIZE_PX, EMBEDDING_DIM


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_models(model_dir: Path, *, seed: int = 0) -> None:
    """Write tiny, random-weight SD components to ``model_dir``.

    Real architectures (the sizes diffusers' own tests use), built offline. The tokenizer is
    a real CLIPTokenizer with a character-level vocabulary (no merges), since no CLIP vocab
    ships in any installable package.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    cross_dim = 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    alphabet = _byte_level_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=cross_dim,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir)


def build_tiny_ip_adapter(model_dir: Path, path: Path, *, seed: int = 0,
                          lora_rank: int = 4) -> None:
    """Random IP-Adapter-FaceID weights for the pipeline in ``model_dir``, written as one
    safetensors file in exactly the published key layout (``ip_adapter_layout``)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from pipeline.models.diffusion import ip_adapter_layout

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in ip_adapter_layout(unet).items():
        if "_lora.down" in key:
            shape = (lora_rank, shape[1])
        elif "_lora.up" in key:
            shape = (shape[0], lora_rank)
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shape)
        elif key.endswith("bias"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def build_tiny_motion_adapter(path: Path, *, seed: int = 0) -> None:
    """A random-weight AnimateDiff MotionAdapter matching ``build_tiny_models``' UNet."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                            motion_norm_num_groups=2, motion_num_attention_heads=4,
                            motion_max_seq_length=32)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    adapter.save_pretrained(staging)
    try:
        staging.rename(path)  # whole, or not at all (another process may have won)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def build_tiny_arcface(path: Path, *, seed: int = 0) -> None:
    """A random-weight ONNX graph with ArcFace's contract: input ``input.1`` (N, 3, 112, 112)
    float, output (N, 512): four strided conv + PReLU blocks, then a linear layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    channels, name = 3, "input.1"
    for i, out_ch in enumerate((8, 16, 32, 32)):
        w = rng.standard_normal((out_ch, channels, 3, 3)).astype(np.float32)
        w *= np.sqrt(2.0 / (channels * 9))
        inits += [numpy_helper.from_array(w, f"conv{i}.w"),
                  numpy_helper.from_array(np.zeros(out_ch, np.float32), f"conv{i}.b"),
                  numpy_helper.from_array(np.full((out_ch, 1, 1), 0.25, np.float32), f"prelu{i}")]
        nodes += [helper.make_node("Conv", [name, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"],
                                   kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("PRelu", [f"c{i}", f"prelu{i}"], [f"p{i}"])]
        channels, name = out_ch, f"p{i}"
    flat = channels * 7 * 7
    fc = (rng.standard_normal((flat, EMBEDDING_DIM)) / np.sqrt(flat)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc.w"),
              numpy_helper.from_array(np.zeros(EMBEDDING_DIM, np.float32), "fc.b")]
    nodes += [helper.make_node("Flatten", [name], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                       ["None", 3, ALIGNED_SIZE_PX, ALIGNED_SIZE_PX])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                       ["None", EMBEDDING_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="ephemera-tiny-arcface")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary file per process: two workers that find it missing at once (the face
    # pool's replicas, the evaluation's two face steps) each write their own, same bytes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def stage_tiny_models(root: Path, storage: StorageConfig, *, dest: str | None = None,
                      face_embedder: Path | None = None, seed: int = 0) -> dict[str, str]:
    """Build the four tiny models under ``root`` (once) and stage each into the model store
    at ``dest`` (a folder, s3://bucket/prefix or gs://bucket/prefix; default: a folder
    under ``root``), one prefix per models.yaml key. ``face_embedder``: an ONNX file to
    stage instead of a new tiny ArcFace. Returns the models.yaml values that serve them
    pinned: each location and its manifest sha256 (what `ephemera models stage` prints)."""
    from pipeline.models.model_store import stage_model

    build = root / "build"
    build.mkdir(parents=True, exist_ok=True)
    sources = {"diffusion_model_dir": build / "tiny-sd",
               "ip_adapter_weights": build / "tiny-ip-adapter-faceid.safetensors",
               "motion_adapter_dir": build / "tiny-motion-adapter",
               "face_embedder_weights": face_embedder or build / "tiny-arcface.onnx"}
    if not (sources["diffusion_model_dir"] / "model_index.json").is_file():
        build_tiny_models(sources["diffusion_model_dir"], seed=seed)
    if not sources["ip_adapter_weights"].is_file():
        build_tiny_ip_adapter(sources["diffusion_model_dir"], sources["ip_adapter_weights"],
                              seed=seed)
    if not (sources["motion_adapter_dir"] / "config.json").is_file():
        build_tiny_motion_adapter(sources["motion_adapter_dir"], seed=seed)
    if not sources["face_embedder_weights"].is_file():
        build_tiny_arcface(sources["face_embedder_weights"], seed=seed)
    base = (dest or str(root / "store")).rstrip("/")
    values = {}
    for key, source in sources.items():
        location = f"{base}/{key}"
        values[key] = location
        values[MODEL_PINS[key]] = stage_model(source, location, storage).sha256
    return values
