"""Diffusion stage: Stable-Diffusion-architecture models from diffusers.

* ``ai_photo``: text-to-image conditioned on the style prompt and, through IP-Adapter-FaceID,
  on the 512-d ArcFace identity embedding. The adapter is loaded with diffusers' own
  ``load_ip_adapter`` (decoupled cross-attention: ``to_k_ip`` / ``to_v_ip`` per attention
  layer, the FaceID projection, and the FaceID LoRA when the file carries one) and fed with
  ``ip_adapter_image_embeds`` (zero embeddings as the negative for classifier-free
  guidance), at an adapter scale per style.
* ``art_style``: image-to-image from the stripped input, conditioned on the style prompt,
  with the adapter switched off (scale 0, LoRA disabled).
* clips (``animate`` from one photo, ``art_style`` on a video): AnimateDiff's
  ``AnimateDiffVideoToVideoPipeline`` (the SD components plus a ``MotionAdapter``, whose
  temporal attention keeps the frames of a chunk consistent). ``animate`` feeds the photo
  as a still clip and lets the motion module move it by the style's ``motion_strength``.

Models are always loaded from files: the pipeline with ``from_pretrained`` from a folder,
the adapter from one file in the published FaceID layout (``image_proj.*`` and
``ip_adapter.*`` keys). On a GPU host they are full-size weights from the model store;
for the embedded default, the demo and tests ``pipeline.models.tiny`` writes tiny
random-weight versions of the real architectures and layouts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AnimateDiffVideoToVideoPipeline,
    MotionAdapter,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.core.errors import ModelError
from pipeline.models.runtime import Runtime

FACE_EMBEDDING_DIM = 512
FACEID_NUM_TOKENS = 4  # what diffusers' FaceID loader builds; the published weights match


def ip_adapter_layout(unet: UNet2DConditionModel) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an IP-Adapter-FaceID file for ``unet``, as the published
    checkpoint (h94/IP-Adapter-FaceID) lays it out: the MLP projection under
    ``image_proj.`` and, under ``ip_adapter.``, the attention layers numbered by their
    position in ``unet.attn_processors``: every layer has the FaceID LoRA
    (``to_{q,k,v,out}_lora``), cross-attention layers (odd numbers) also ``to_k_ip`` and
    ``to_v_ip``. LoRA shapes are given for rank 1; the rank is the file's choice."""
    cross = unet.config.cross_attention_dim
    inner = 2 * FACE_EMBEDDING_DIM  # the published MLP widens 512 -> 1024
    layout: dict[str, tuple[int, ...]] = {
        "image_proj.proj.0.weight": (inner, FACE_EMBEDDING_DIM),
        "image_proj.proj.0.bias": (inner,),
        "image_proj.proj.2.weight": (cross * FACEID_NUM_TOKENS, inner),
        "image_proj.proj.2.bias": (cross * FACEID_NUM_TOKENS,),
        "image_proj.norm.weight": (cross,),
        "image_proj.norm.bias": (cross,),
    }
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden, context = attn.to_q.in_features, attn.to_k.in_features
        for proj, (fan_in, fan_out) in {"to_q": (hidden, hidden), "to_k": (context, hidden),
                                        "to_v": (context, hidden),
                                        "to_out": (hidden, hidden)}.items():
            layout[f"ip_adapter.{index}.{proj}_lora.down.weight"] = (1, fan_in)
            layout[f"ip_adapter.{index}.{proj}_lora.up.weight"] = (fan_out, 1)
        if name.endswith("attn2.processor"):
            layout[f"ip_adapter.{index}.to_k_ip.weight"] = (hidden, cross)
            layout[f"ip_adapter.{index}.to_v_ip.weight"] = (hidden, cross)
    return layout


def check_ip_adapter(path: Path, unet: UNet2DConditionModel) -> None:
    """Refuse, naming the problem, an adapter file that diffusers' FaceID loader would
    misread or reject with a less useful error."""
    if not path.is_file():
        raise ModelError(f"IP-Adapter file {path} does not exist; point models.yaml "
                         "ip_adapter_weights at an IP-Adapter-FaceID file or store location")
    if path.suffix != ".safetensors":
        raise ModelError(f"IP-Adapter file {path} must be .safetensors (convert a published "
                         ".bin with `ephemera models convert-ip-adapter`)")
    with safe_open(str(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    expected = ip_adapter_layout(unet)
    if "image_proj.norm.weight" not in shapes:
        raise ModelError(f"{path} is not an IP-Adapter-FaceID file (no image_proj.norm.weight;"
                         " FaceID Plus and plain IP-Adapter files need a CLIP image encoder)")
    in_dim = shapes.get("image_proj.proj.0.weight", (0, 0))[1]
    if in_dim != FACE_EMBEDDING_DIM:
        raise ModelError(f"{path} projects {in_dim}-d face embeddings; the ArcFace embedder "
                         f"gives {FACE_EMBEDDING_DIM}-d")
    for key, shape in expected.items():
        if "_lora." in key:
            continue  # optional; rank is free
        if shapes.get(key) != shape:
            raise ModelError(f"{path}: {key} has shape {shapes.get(key)}, the UNet needs "
                             f"{shape}; the adapter was trained for another base model")


def convert_ip_adapter_bin(src: Path, dest: Path) -> None:
    """A published ``.bin`` adapter (a pickled {"image_proj": ..., "ip_adapter": ...} dict)
    as one flat safetensors file, so GPU nodes never unpickle: read with weights_only."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise ModelError(f"{src} holds no image_proj / ip_adapter state dicts")
    flat = {f"{part}.{key}": tensor.contiguous()
            for part in ("image_proj", "ip_adapter") for key, tensor in state[part].items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(dest))


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What one batch shares (the batching key guarantees it)."""

    prompt: str
    resolution_px: int
    num_inference_steps: int
    guidance_scale: float
    strength: float = 0.6  # art_style only
    face_scale: float = 0.7  # ai_photo only: IP-Adapter scale of the face tokens


class DiffusionGenerator:
    """Holds the pipelines on one device and runs batched generation."""

    def __init__(self, model_dir: Path, runtime: Runtime, *, ip_adapter: Path,
                 motion_adapter: Path | None = None) -> None:
        self.runtime = runtime
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, torch_dtype=runtime.dtype, safety_checker=None,
            requires_safety_checker=False,
        )
        check_ip_adapter(ip_adapter, pipe.unet)
        pipe = pipe.to(runtime.device)
        # The motion pipeline copies the plain UNet into a UNetMotionModel, before the
        # face adapter changes the UNet's attention (one more UNet in GPU memory).
        self.vid2vid = _motion_pipeline(pipe, motion_adapter, runtime) if motion_adapter else None
        if runtime.attention == "xformers":  # before the adapter: it keeps the backend
            pipe.enable_xformers_memory_efficient_attention()
        pipe.load_ip_adapter(str(ip_adapter.parent), subfolder="", weight_name=ip_adapter.name,
                             image_encoder_folder=None, local_files_only=True)
        self._ip_processors = [p for p in pipe.unet.attn_processors.values()
                               if isinstance(getattr(p, "scale", None), list)]
        self._has_lora = bool(getattr(pipe.unet, "peft_config", None))
        if runtime.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if runtime.compile:  # before img2img shares the components, so both use it
            pipe.unet = torch.compile(pipe.unet)
        pipe.set_progress_bar_config(disable=True)
        self.txt2img = pipe
        self.img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        self.img2img.set_progress_bar_config(disable=True)
        for pipeline in (self.txt2img, self.img2img):
            pipeline.prepare_ip_adapter_image_embeds = _one_face_per_row  # type: ignore[method-assign]
        # The adapter's scale and LoRA switch are state of the shared UNet: one model call
        # at a time sets and uses them (GPU kernels of one replica run in turn anyway).
        self._model_lock = threading.Lock()

    def _set_adapter(self, scale: float) -> None:
        """Scale of the face tokens in every IP attention layer; 0 also turns the FaceID
        LoRA off, so art styles run on the plain base model."""
        for processor in self._ip_processors:
            processor.scale = [scale]
        if self._has_lora:
            unet = getattr(self.txt2img.unet, "_orig_mod", self.txt2img.unet)
            if scale > 0:
                unet.enable_lora()
            else:
                unet.disable_lora()

    def _face_embeds(self, face_embeddings: np.ndarray, cfg: bool) -> torch.Tensor:
        """diffusers' ``ip_adapter_image_embeds`` entry for FaceID: (B, 1, 512), with the
        zero (negative) embeddings first when guidance is on."""
        emb = torch.as_tensor(face_embeddings, device=self.runtime.device,
                              dtype=self.runtime.dtype)[:, None, :]
        return torch.cat([torch.zeros_like(emb), emb]) if cfg else emb

    def _text_embeds(self, prompt: str, batch: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos, neg = self.txt2img.encode_prompt(
            prompt, self.runtime.device, batch, cfg, negative_prompt="" if cfg else None
        )
        return pos, neg

    @torch.inference_mode()
    def ai_photos(self, face_embeddings: np.ndarray, params: GenerationParams,
                  seeds: list[int]) -> np.ndarray:
        """(B, 512) ArcFace embeddings -> (B, H, W, 3) uint8 images."""
        if face_embeddings.ndim != 2 or face_embeddings.shape[1] != FACE_EMBEDDING_DIM:
            raise ModelError(f"face embeddings have shape {face_embeddings.shape}; "
                             f"IP-Adapter-FaceID takes (B, {FACE_EMBEDDING_DIM})")
        batch = face_embeddings.shape[0]
        cfg = params.guidance_scale > 1.0
        text, neg_text = self._text_embeds(params.prompt, batch, cfg)
        faces = self._face_embeds(face_embeddings, cfg)
        with self._model_lock:
            self._set_adapter(params.face_scale)
            out = self.txt2img(
                prompt_embeds=text,
                negative_prompt_embeds=neg_text,
                ip_adapter_image_embeds=[faces],
                height=params.resolution_px,
                width=params.resolution_px,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
            )
        return _to_uint8(out.images)

    @torch.inference_mode()
    def clip(self, frames: list[np.ndarray], params: GenerationParams, seed: int,
             size_px: tuple[int, int]) -> np.ndarray:
        """One clip chunk: F frames (H, W, 3) uint8 -> (F, height, width, 3) uint8 at
        ``size_px`` (width, height), temporally consistent through the motion module."""
        if self.vid2vid is None:
            raise ModelError("clips need models.yaml motion_adapter_dir (AnimateDiff)")
        if int(params.num_inference_steps * params.strength) < 1:
            raise ValueError(
                f"strength {params.strength} x num_inference_steps {params.num_inference_steps}"
                " runs no denoising step; raise either so the product is >= 1")
        cfg = params.guidance_scale > 1.0
        text, neg_text = self._text_embeds(params.prompt, 1, cfg)
        pil = [Image.fromarray(f).resize(size_px, Image.Resampling.LANCZOS) for f in frames]
        with self._model_lock:
            out = self.vid2vid(
                video=pil, prompt_embeds=text, negative_prompt_embeds=neg_text,
                width=size_px[0], height=size_px[1], strength=params.strength,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
            )
        return _to_uint8(np.asarray(out.frames)[0])

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
        # The UNet now expects face tokens: zeros at scale 0, which its layers skip.
        faces = self._face_embeds(np.zeros((batch, FACE_EMBEDDING_DIM), np.float32), cfg)
        with self._model_lock:
            self._set_adapter(0.0)
            out = self.img2img(
                prompt_embeds=text,
                negative_prompt_embeds=neg_text,
                ip_adapter_image_embeds=[faces],
                image=pil,
                strength=params.strength,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
            )
        return _to_uint8(out.images)


def _motion_pipeline(pipe: StableDiffusionPipeline, motion_adapter: Path,
                     runtime: Runtime) -> AnimateDiffVideoToVideoPipeline:
    adapter = MotionAdapter.from_pretrained(motion_adapter, torch_dtype=runtime.dtype)
    vid2vid = AnimateDiffVideoToVideoPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        motion_adapter=adapter, scheduler=pipe.scheduler,
    ).to(runtime.device, runtime.dtype)
    if runtime.attention == "xformers":
        vid2vid.enable_xformers_memory_efficient_attention()
    vid2vid.set_progress_bar_config(disable=True)
    return vid2vid


def _one_face_per_row(ip_adapter_image, ip_adapter_image_embeds, device,
                      num_images_per_prompt, do_classifier_free_guidance) -> list[torch.Tensor]:
    """Replaces the pipelines' ``prepare_ip_adapter_image_embeds``: diffusers repeats one
    conditioning image for every row of a batch, but a batch of jobs has one face per row.
    Our embeds are already (B, 1, 512), or (2B, 1, 512) negatives first under guidance, in
    the row order of the prompt embeddings."""
    return [embeds.to(device) for embeds in ip_adapter_image_embeds]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8. Refuses NaN or Inf (an fp16 overflow, usually in
    the VAE), which a cast would turn silently into black pixels."""
    bad = int(np.size(images) - np.isfinite(images).sum())
    if bad:
        raise ModelError(f"the model produced {bad} NaN/Inf values of {np.size(images)}; "
                         "an fp16 overflow is the usual cause: try models.yaml dtype: "
                         "bfloat16 or float32")
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)

