"""Diffusion stage: Stable-Diffusion-architecture models from diffusers.

* ``ai_photo``: text-to-image conditioned on the style prompt plus face tokens: the
  512-d identity embedding is projected into cross-attention tokens by diffusers'
  ``IPAdapterFaceIDImageProjection`` (IP-Adapter-FaceID style) and appended to the text
  tokens.
* ``art_style``: image-to-image from the stripped input, conditioned on the style prompt.

Models are always loaded with ``from_pretrained`` from a directory. For the demo and tests
``build_tiny_models`` writes tiny random-weight versions of the real architectures there
with ``save_pretrained``; on a GPU host the directory holds full-size weights instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import IPAdapterFaceIDImageProjection
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.runtime import Runtime

FACE_EMBEDDING_DIM = 512
FACE_PROJ_DIR = "face_proj"


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_models(model_dir: Path, *, seed: int = 0, num_face_tokens: int = 4) -> None:
    """Write tiny, random-weight SD components and a face projection to ``model_dir``.

    Real architectures (the sizes diffusers' own tests use), built offline. The tokenizer is
    a real CLIPTokenizer with a character-level vocabulary (no merges), since no CLIP vocab
    ships in any installable package.
    """
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
    proj = IPAdapterFaceIDImageProjection(
        image_embed_dim=FACE_EMBEDDING_DIM, cross_attention_dim=cross_dim, mult=1,
        num_tokens=num_face_tokens,
    )
    save_face_projection(proj, model_dir / FACE_PROJ_DIR)


def save_face_projection(proj: IPAdapterFaceIDImageProjection, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "image_embed_dim": proj.ff.net[0].proj.in_features,
        "cross_attention_dim": proj.cross_attention_dim,
        "num_tokens": proj.num_tokens,
        "mult": proj.ff.net[0].proj.out_features // proj.ff.net[0].proj.in_features,
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()},
              str(path / "model.safetensors"))


def load_face_projection(path: Path) -> IPAdapterFaceIDImageProjection:
    config = json.loads((path / "config.json").read_text())
    proj = IPAdapterFaceIDImageProjection(**config)
    proj.load_state_dict(load_file(str(path / "model.safetensors")))
    return proj.eval()


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What one batch shares (the batching key guarantees it)."""

    prompt: str
    resolution_px: int
    num_inference_steps: int
    guidance_scale: float
    strength: float = 0.6  # art_style only


class DiffusionGenerator:
    """Holds the pipelines on one device and runs batched generation."""

    def __init__(self, model_dir: Path, runtime: Runtime) -> None:
        self.runtime = runtime
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, torch_dtype=runtime.dtype, safety_checker=None,
            requires_safety_checker=False,
        )
        pipe = pipe.to(runtime.device)
        if runtime.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        if runtime.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if runtime.compile:  # before img2img shares the components, so both use it
            pipe.unet = torch.compile(pipe.unet)
        pipe.set_progress_bar_config(disable=True)
        self.txt2img = pipe
        self.img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        self.img2img.set_progress_bar_config(disable=True)
        self.face_proj = load_face_projection(model_dir / FACE_PROJ_DIR).to(
            runtime.device, runtime.dtype
        )

    def _text_embeds(self, prompt: str, batch: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos, neg = self.txt2img.encode_prompt(
            prompt, self.runtime.device, batch, cfg, negative_prompt="" if cfg else None
        )
        return pos, neg

    @torch.inference_mode()
    def ai_photos(self, face_embeddings: np.ndarray, params: GenerationParams,
                  seeds: list[int]) -> np.ndarray:
        """(B, 512) embeddings -> (B, H, W, 3) uint8 images."""
        batch = face_embeddings.shape[0]
        cfg = params.guidance_scale > 1.0
        text, neg_text = self._text_embeds(params.prompt, batch, cfg)
        emb = torch.as_tensor(face_embeddings, device=self.runtime.device, dtype=self.runtime.dtype)
        face_tokens = self.face_proj(emb)
        prompt_embeds = torch.cat([text, face_tokens], dim=1)
        negative = (
            torch.cat([neg_text, torch.zeros_like(face_tokens)], dim=1)
            if neg_text is not None else None
        )
        out = self.txt2img(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            height=params.resolution_px,
            width=params.resolution_px,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        )
        return _to_uint8(out.images)

    @torch.inference_mode()
    def art_styles(self, images: list[np.ndarray], params: GenerationParams,
                   seeds: list[int]) -> np.ndarray:
        """B input images (H, W, 3) uint8 -> (B, R, R, 3) uint8 restyled images."""
        if int(params.num_inference_steps * params.strength) < 1:
            raise ValueError(
                f"strength {params.strength} x num_inference_steps {params.num_inference_steps}"
                " runs no denoising step; raise either so the product is >= 1"
            )
        size = params.resolution_px
        batch = len(images)
        cfg = params.guidance_scale > 1.0
        text, neg_text = self._text_embeds(params.prompt, batch, cfg)
        pil = [Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS) for im in images]
        out = self.img2img(
            prompt_embeds=text,
            negative_prompt_embeds=neg_text,
            image=pil,
            strength=params.strength,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        )
        return _to_uint8(out.images)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def load_generator(model_dir: Path, runtime: Runtime, *, build_tiny_if_missing: bool) -> DiffusionGenerator:
    """Load from ``model_dir``; build tiny random weights there first if allowed and absent."""
    if not (model_dir / "model_index.json").is_file():
        if not build_tiny_if_missing:
            raise ValueError(
                f"diffusion_model_dir {model_dir} holds no model_index.json; point it at a "
                "save_pretrained directory or set build_tiny_if_missing: true"
            )
        build_tiny_models(model_dir)
    return DiffusionGenerator(model_dir, runtime)
