"""Operator configs: one pydantic model per YAML file in ``configs/``.

Every model forbids unknown keys, bounds every number and describes every field, so a typo
or an out-of-range value stops the service at start-up with a message naming the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from pipeline.core.records import Stage

APP_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/ and configs/
CONFIG_DIR = APP_ROOT / "configs"


MAX_CONCURRENT_BATCHES = 8  # Serve's per-replica cap; the live limit is batching.yaml's

# Each model location in models.yaml and the key pinning its manifest's sha256.
MODEL_PINS = {"diffusion_model_dir": "diffusion_model_sha256",
              "ip_adapter_weights": "ip_adapter_sha256",
              "motion_adapter_dir": "motion_adapter_sha256",
              "face_embedder_weights": "face_embedder_sha256"}
# Validation context of a load that does not start the service (``load_settings``).
UNPINNED_OK = {"require_pins": False}


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback_redis(url: str | None) -> bool:
    """Whether ``service.yaml redis_url`` stays on this machine: null (the embedded server),
    a unix socket, or a host on loopback. Anything else, unparseable included, is remote."""
    if url is None:
        return True
    try:
        parsed = urlsplit(url)
        host = parsed.hostname
    except ValueError:
        return False
    if parsed.scheme == "unix":
        return True
    return parsed.scheme in ("redis", "rediss") and host in LOOPBACK_HOSTS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(_Strict):
    """configs/service.yaml: HTTP edge, upload limits, Redis and the object store."""

    http_host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to.")
    http_port: int = Field(0, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    api_token_env: str | None = Field(
        None, description="Name of an environment variable holding the bearer token the app "
        "backend must send (Authorization: Bearer ...); null: no token (loopback demo only)."
    )
    metrics_token_env: str | None = Field(
        None, description="Name of an environment variable holding a second bearer token, "
        "for Prometheus: accepted on GET /metrics only, never on /v1, so the scraper does not "
        "hold the users' API token (which also still works on /metrics). null: /metrics takes "
        "the API token only. Needs api_token_env."
    )
    redis_url: str | None = Field(
        None, description="redis://host:port/db; null starts an embedded server on a free port."
    )
    max_files_per_job: int = Field(4, gt=0, le=32, description="Most images in one request.")
    max_file_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest accepted upload file, in bytes."
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest width*height decoded (decompression-bomb guard)."
    )
    max_pixels_per_byte: float = Field(
        2000.0, gt=0, description="A photo declaring more pixels per byte of image data than "
        "this is refused before decoding (a 40 MP header on 800 bytes is a bomb, not a photo); "
        "metadata and padding chunks do not count as image data."
    )
    max_request_pixels: int = Field(
        80_000_000, gt=0, description="Decoded-pixel budget of one request, all files together."
    )
    min_image_side_px: int = Field(32, gt=0, description="Smallest accepted width or height.")
    allowed_resolutions_px: list[Annotated[int, Field(ge=64, le=4096, multiple_of=8)]] = Field(
        [64], min_length=1, description="Output sizes (square, 64..4096, multiples of 8)."
    )
    default_resolution_px: int = Field(64, gt=0, description="Output size when none is given.")
    output_format: Literal["png", "webp"] = Field("png", description="Encoding of outputs.")
    video_output_format: Literal["mp4", "webp"] = Field(
        "mp4", description="Clips (animate, styled videos): H.264 MP4, or animated WebP."
    )
    max_video_bytes: int = Field(
        64 * 1024 * 1024, gt=0, le=2 * 1024**3, description="Largest accepted video, in bytes."
    )
    max_video_duration_s: float = Field(15.0, gt=0, le=600, description="Longest video.")
    max_video_frames: int = Field(450, gt=0, le=36_000, description="Most frames in a video.")
    max_video_fps: float = Field(60.0, gt=0, le=240, description="Highest frame rate.")
    max_video_pixels: int = Field(
        1920 * 1080, gt=0, le=8192 * 8192, description="Most pixels per video frame."
    )
    max_video_total_pixels: int = Field(
        1920 * 1080 * 450, gt=0, description="Most pixels decoded from one video, all frames "
        "together (each frame is also checked against max_video_pixels as it is decoded).")
    video_codecs: list[Literal["h264", "hevc", "vp8", "vp9", "av1"]] = Field(
        ["h264", "hevc", "vp8", "vp9", "av1"], min_length=1,
        description="Video codecs accepted (what phones and browsers record); any other "
        "codec inside an allowed container is refused before a frame is decoded.")
    max_jpeg_scans: int = Field(
        64, gt=0, le=10_000, description="Most scans in a JPEG (counted before decoding; a "
        "progressive phone photo has about 10, each scan is a full pass over the image).")
    decode_memory_bytes: int = Field(
        512 * 1024 * 1024, ge=64 * 1024 * 1024, description="Address space one file's "
        "decoding may add to its sandbox process (RLIMIT_AS); past it the file is refused.")
    decode_cpu_s: float = Field(
        10.0, gt=0, le=600, description="CPU one file's decoding may take (RLIMIT_CPU).")
    decode_wall_s: float = Field(
        30.0, gt=0, le=1200, description="Wall time one file's decoding may take.")
    request_decode_cpu_s: float = Field(
        20.0, gt=0, le=1200, description="CPU all files of one request may take together.")
    request_decode_wall_s: float = Field(
        60.0, gt=0, le=2400, description="Wall time all files of one request may take together.")
    ray_address: str | None = Field(
        None, description="null starts a local Ray instance; 'auto' joins the running cluster."
    )
    ray_num_cpus: int = Field(4, gt=0, description="Logical CPUs of a local Ray instance.")
    ray_object_store_mb: int | None = Field(
        None, ge=80, description="Object store size of a local Ray (null: Ray's default)."
    )
    ray_metrics_export_port: int | None = Field(
        None, ge=1024, le=65535, description="Port of a local Ray's metrics agent, for "
        "Prometheus (null: Ray picks one). A cluster sets it in `ray start`."
    )
    ray_spill_root: str = Field(
        "/dev/shm", description="Memory-backed (tmpfs) folder for Ray spilling and fallback "
        "allocations, so nothing from the object store ever reaches a disk."
    )
    job_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="A job not finished this long after acceptance fails."
    )
    max_jobs_in_flight_per_account: int = Field(
        8, gt=0, le=10_000, description="Unfinished jobs one account may have; more get HTTP "
        "429 with Retry-After."
    )
    retry_after_s: int = Field(
        5, gt=0, le=3600, description="Retry-After sent with 429 and 503 (service full)."
    )
    idempotency_window_s: float = Field(
        86400.0, gt=0, le=7 * 86400, description="How long a POST /v1/jobs Idempotency-Key "
        "returns the job it first created."
    )
    usage_flush_s: float = Field(
        10.0, gt=0, le=3600, description="Job runners write their usage events (Parquet, "
        "under usage/ in the outputs store) this often."
    )
    heartbeat_lease_s: float = Field(
        15.0, ge=2, le=600, description="A job runner or ingress replica not heard from this "
        "long is gone: the jobs it held fail (their device keys died with it) and are purged, "
        "and a request it was handling can be retried with the same Idempotency-Key."
    )

    @model_validator(mode="after")
    def _metrics_token_is_its_own(self) -> ServiceConfig:
        if self.metrics_token_env is not None and self.api_token_env is None:
            raise ValueError("service.yaml metrics_token_env needs api_token_env: without an "
                             "API token /metrics is open to anyone on loopback; set both or "
                             "neither")
        if self.metrics_token_env is not None and self.metrics_token_env == self.api_token_env:
            raise ValueError(f"service.yaml metrics_token_env names {self.metrics_token_env}, "
                             "the API token's variable; name another, so Prometheus never "
                             "holds the token that reaches users' data")
        return self

    @model_validator(mode="after")
    def _default_is_allowed(self) -> ServiceConfig:
        if self.default_resolution_px not in self.allowed_resolutions_px:
            raise ValueError(
                f"default_resolution_px={self.default_resolution_px} is not in "
                f"allowed_resolutions_px={self.allowed_resolutions_px}; add it or change it"
            )
        return self


US_AWS_REGIONS = ("us-east-1", "us-east-2", "us-west-1", "us-west-2")


class S3Config(_Strict):
    """An AWS S3 bucket (or an S3-protocol server on loopback in tests)."""

    bucket: str = Field(min_length=3, max_length=63, description="Bucket name.")
    region: str = Field(description="AWS region; US regions only (privacy policy).")
    endpoint_url: str | None = Field(
        None, description="A non-AWS S3 endpoint (tests: SeaweedFS on 127.0.0.1); null: AWS."
    )
    sse_c_inputs: bool = Field(
        False, description="Also encrypt inputs and face data with SSE-C under the device key."
    )
    output_encryption: Literal["AES256", "aws:kms", "none"] = Field(
        "AES256", description="Server-side encryption of outputs (server-managed key)."
    )
    versioned_bucket: bool = Field(
        False, description="The bucket keeps versions: deletes then remove every version by id."
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Connect/read timeout per call.")
    max_attempts: int = Field(5, gt=0, le=20, description="Tries per call on timeouts and 5xx.")

    @model_validator(mode="after")
    def _us_only(self) -> S3Config:
        if self.region not in US_AWS_REGIONS:
            raise ValueError(
                f"s3.region {self.region!r} is outside the US; the privacy policy keeps AWS "
                f"data in the US: use one of {', '.join(US_AWS_REGIONS)}"
            )
        return self


class GcsConfig(_Strict):
    """Google Cloud Storage: one bucket per region, chosen by the user's country."""

    project: str = Field(min_length=1, description="GCP project id.")
    endpoint_url: str | None = Field(
        None, description="A GCS-protocol endpoint (tests: an emulator on 127.0.0.1)."
    )
    buckets: dict[str, str] = Field(min_length=1, description="Region -> bucket name.")
    country_regions: dict[str, str] = Field(
        default_factory=dict, description="ISO 3166-1 alpha-2 country -> nearest region."
    )
    fallback_region: str = Field(description="Region for a country not in the table.")
    csek_inputs: bool = Field(
        False, description="Also encrypt inputs and face data with CSEK under the device key."
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout per call.")
    max_attempts: int = Field(5, gt=0, le=20, description="Tries per call on timeouts and 5xx.")

    @model_validator(mode="after")
    def _regions_have_buckets(self) -> GcsConfig:
        for where, region in [("fallback_region", self.fallback_region),
                              *((f"country_regions.{c}", r)
                                for c, r in self.country_regions.items())]:
            if region not in self.buckets:
                raise ValueError(f"gcs.{where} names region {region!r}, which has no bucket "
                                 "in gcs.buckets; add one")
        for country in self.country_regions:
            if len(country) != 2 or not country.isalpha() or not country.isupper():
                raise ValueError(f"gcs.country_regions key {country!r} is not an ISO 3166-1 "
                                 "alpha-2 code such as 'TR'")
        return self


class StorageConfig(_Strict):
    """configs/storage.yaml: where inputs (with face data) and outputs are stored."""

    inputs: Literal["local", "s3", "gcs"] = Field(
        "local", description="Store of uploads and face data during processing."
    )
    outputs: Literal["local", "s3"] = Field(
        "local", description="Store of generated photos (kept until the user deletes them)."
    )
    local_root: str = Field("./data/store", description="Folder of the embedded local store.")
    signed_url_ttl_s: int = Field(
        300, gt=0, le=3600, description="Lifetime of a signed output download URL."
    )
    s3: S3Config | None = Field(None, description="Required when inputs or outputs is s3.")
    gcs: GcsConfig | None = Field(None, description="Required when inputs is gcs.")

    @model_validator(mode="after")
    def _backends_configured(self) -> StorageConfig:
        if "s3" in (self.inputs, self.outputs) and self.s3 is None:
            raise ValueError("storage.yaml uses s3 but has no s3: section")
        if self.inputs == "gcs" and self.gcs is None:
            raise ValueError("storage.yaml inputs: gcs but has no gcs: section")
        return self


class StageBatchConfig(_Strict):
    """Batching knobs of one GPU pool, applied live to every replica (Serve user_config)."""

    max_batch_cost: int = Field(
        8, gt=0, le=4096, description="Most cost units in one model call. A job costs one unit "
        "per image it generates at batching.yaml reference_resolution_px (more for larger "
        "images, times frames for video), so batches are sized by work, not by job count."
    )
    max_wait_ms: float = Field(
        50.0, ge=0, le=60_000, description="Longest the first job of a batch waits for it to "
        "fill, in ms."
    )
    max_concurrent_batches: int = Field(
        1, gt=0, le=MAX_CONCURRENT_BATCHES, description="Model calls one replica runs at once "
        "(per replica: N replicas run N x this)."
    )

    @property
    def max_ongoing_requests(self) -> int:
        """Jobs a replica accepts: its running batches plus one forming, so the next batch
        fills while the GPU works and the rest wait at the callers (back-pressure)."""
        return self.max_batch_cost * (self.max_concurrent_batches + 1)


class BatchingConfig(_Strict):
    """configs/batching.yaml: batching per GPU pool and the job runners' retry policy.

    Tuned at run time: each pool receives its section as Serve ``user_config``, applied by
    ``reconfigure()`` on the running replicas (``ephemera tune``, or ``serve deploy``).
    """

    reference_resolution_px: int = Field(
        64, ge=64, le=4096, description="Image side whose generation costs one unit."
    )
    face: StageBatchConfig = Field(default_factory=StageBatchConfig, description="Face pool.")
    diffusion: StageBatchConfig = Field(
        default_factory=StageBatchConfig, description="Diffusion pool."
    )
    max_attempts: int = Field(
        3, gt=0, le=10, description="Tries per job when a stage worker crashes mid-batch."
    )
    stage_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="A stage call not answered in this time counts as a crash."
    )
    video_chunk_frames: int = Field(
        8, gt=0, le=64, description="Frames of one video (or animation) per diffusion call: "
        "a long video goes through in chunks, so photo jobs get model calls in between. "
        "The motion module keeps frames consistent within a chunk; chunks share noise."
    )

    def runner_user_config(self) -> dict:
        return {"max_attempts": self.max_attempts, "stage_timeout_s": self.stage_timeout_s}


class AutoscalingConfig(_Strict):
    """Serve autoscaling of one deployment (Serve's own autoscaler)."""

    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest replicas (0: scale to zero).")
    max_replicas: int = Field(4, gt=0, le=1024, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=10_000, description="Ongoing requests per replica the autoscaler aims at."
    )
    upscale_delay_s: float = Field(2.0, ge=0, le=3600, description="Sustained load before adding.")
    downscale_delay_s: float = Field(
        30.0, ge=0, le=86400, description="Sustained idleness before removing a replica."
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling min_replicas {self.min_replicas} exceeds "
                             f"max_replicas {self.max_replicas}")
        return self

    def serve_options(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}


class PoolConfig(_Strict):
    """Replicas and resources of one Serve deployment."""

    num_replicas: int = Field(1, gt=0, le=1024, description="Fixed replica count (no autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Serve autoscaling; when set, num_replicas is ignored."
    )
    num_cpus: float = Field(1.0, ge=0, le=256, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, le=16, description="GPUs reserved per replica.")
    memory_bytes: int | None = Field(
        None, gt=0, description="Memory reserved per replica (Ray's memory resource), so a "
        "node is not handed more replicas than it can hold; null: none reserved.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs, to steer "
        "it onto a node type (production: cpu_node on CPU workers, so no CPU replica lands "
        "on a GPU machine); {}: any node with room.")
    max_ongoing_requests: int | None = Field(
        None, gt=0, le=100_000, description="Requests one replica works on at once; null: "
        "derived (GPU pools: from batching.yaml)."
    )
    max_queued_requests: int = Field(
        1000, gt=0, le=1_000_000, description="Requests each caller queues for this pool when "
        "every replica is busy; beyond it the caller gets back-pressure (HTTP 503)."
    )

    def replica_options(self) -> dict:
        options: dict = {"ray_actor_options": {"num_cpus": self.num_cpus,
                                               "num_gpus": self.num_gpus},
                         "max_queued_requests": self.max_queued_requests}
        if self.memory_bytes is not None:
            options["ray_actor_options"]["memory"] = self.memory_bytes
        if self.resources:
            options["ray_actor_options"]["resources"] = dict(self.resources)
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.serve_options()
        else:
            options["num_replicas"] = self.num_replicas
        if self.max_ongoing_requests is not None:
            options["max_ongoing_requests"] = self.max_ongoing_requests
        return options


class DeploymentsConfig(_Strict):
    """configs/deployments.yaml: every pool scales horizontally by config."""

    api: PoolConfig = Field(default_factory=PoolConfig, description="HTTP ingress: reads "
                            "requests, checks their shape, hands uploads to the media pool.")
    media: PoolConfig = Field(default_factory=PoolConfig, description="Media: decode, strip, "
                              "re-encode (in sandboxed child processes, one per CPU), "
                              "encrypt and store every upload (CPU).")
    runner: PoolConfig = Field(default_factory=PoolConfig, description="Job runners: each "
                               "drives the jobs handed to it, holding their keys in memory.")
    face: PoolConfig = Field(default_factory=PoolConfig, description="Face detection + embedding.")
    diffusion: PoolConfig = Field(default_factory=PoolConfig, description="Diffusion + outputs.")
    retention: PoolConfig = Field(default_factory=PoolConfig, description="Purge, sweep, "
                                  "reconcile, account deletion.")


class SimulatedGpuConfig(_Strict):
    """The GPU stand-in's cost model (benchmarks only: pipeline/models/simulated.py)."""

    overhead_s: float = Field(0.25, ge=0, le=60, description="Fixed time of one model call.")
    s_per_unit: float = Field(
        1.35, gt=0, le=60, description="Time per cost unit (one reference-size image)."
    )
    time_scale: float = Field(
        1.0, gt=0, le=10, description="Multiplies every modelled time (shorter benchmarks)."
    )


class ModelsConfig(_Strict):
    """configs/models.yaml: which weights, on which device, in which precision."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks cuda when available, else cpu."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on cuda, float32 on cpu."
    )
    attention: Literal["auto", "sdpa", "xformers"] = Field(
        "auto", description="auto: xformers if installed on cuda, else torch SDPA."
    )
    diffusion_backend: Literal["diffusers", "simulated"] = Field(
        "diffusers", description="diffusers: real models. simulated: a GPU stand-in for scale "
        "benchmarks that sleeps by a cost model; refused in any production-shaped config."
    )
    simulated: SimulatedGpuConfig = Field(
        default_factory=SimulatedGpuConfig, description="Cost model of the simulated backend."
    )
    diffusion_model_dir: str = Field(
        "models/tiny-sd", description="The diffusion pipeline saved with save_pretrained: a "
        "folder (relative: repo), or a model-store location s3://bucket/prefix or "
        "gs://bucket/prefix (fetched once into model_cache_dir and verified)."
    )
    diffusion_model_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="The sha256 of the model's manifest.json "
        "(printed by `ephemera models stage`): a node refuses any other version. null: any."
    )
    model_cache_dir: str = Field(
        "models/cache", description="Local folder where GPU nodes keep verified copies of "
        "store models (relative: repo)."
    )
    build_tiny_if_missing: bool = Field(
        True, description="Build tiny random-weight models into diffusion_model_dir if absent."
    )
    num_inference_steps: int = Field(10, gt=0, le=200, description="Denoising steps.")
    ip_adapter_weights: str = Field(
        "models/tiny-ip-adapter-faceid.safetensors", description="IP-Adapter-FaceID weights "
        "(one .safetensors file in the published image_proj./ip_adapter. layout): a file "
        "(relative: repo) or a model-store location s3://bucket/prefix or gs://bucket/prefix."
    )
    ip_adapter_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="The sha256 of the adapter's store "
        "manifest.json: a node refuses any other version. null: any."
    )
    motion_adapter_dir: str = Field(
        "models/tiny-motion-adapter", description="AnimateDiff MotionAdapter (save_pretrained "
        "folder) for animate and video art styles: a folder or a model-store location."
    )
    motion_adapter_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="The sha256 of the motion adapter's "
        "store manifest.json. null: any."
    )
    face_embedder_weights: str = Field(
        "models/tiny-arcface.onnx", description="ArcFace-format ONNX embedder (InsightFace "
        "layout: (N,3,112,112) in, (N,512) out): a file or a model-store location."
    )
    face_embedder_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="The sha256 of the embedder's store "
        "manifest.json. null: any."
    )
    face_min_probability: float = Field(
        0.9, gt=0, le=1, description="MTCNN confidence below which a face is ignored."
    )
    face_detect_canvas_px: int = Field(
        512, ge=128, le=2048, description="Every image of a face batch is scaled to fit this "
        "square for one batched detector call (alignment then uses the full-size image)."
    )
    face_min_eye_distance_px: float = Field(
        20.0, gt=0, le=1000, description="A face whose eyes are closer than this in the "
        "upload is too small to carry an identity: the job fails saying so."
    )
    face_min_sharpness: float = Field(
        10.0, ge=0, description="Variance of the Laplacian of the aligned 112x112 face below "
        "which it is too blurred for identity (sharp photos score in the hundreds)."
    )
    torch_num_threads: int = Field(1, gt=0, le=256, description="Intra-op threads per actor.")
    channels_last: bool = Field(
        False, description="Keep the UNet and VAE in channels-last memory format (faster "
        "convolutions on recent GPUs)."
    )
    torch_compile: bool = Field(
        False, description="torch.compile the UNet at load (minutes of warm-up on the first "
        "batch of each shape; pays off on long-running GPU replicas)."
    )


class StyleConfig(_Strict):
    """One art style or look."""

    prompt: str = Field(min_length=1, max_length=300, description="Text conditioning.")
    strength: float = Field(
        0.6, gt=0, le=1, description="art_style img2img: how far from the input to go."
    )
    guidance_scale: float = Field(
        1.0, ge=1.0, le=30.0, description="Classifier-free guidance; 1.0 turns it off."
    )
    face_scale: float = Field(
        0.7, ge=0.0, le=2.0, description="ai_photo: IP-Adapter scale of the face tokens "
        "(0 ignores the face; about 0.5-1.0 keeps identity and lets the style through)."
    )
    num_frames: int = Field(8, ge=2, le=64, description="animate: frames of the clip.")
    fps: int = Field(8, ge=1, le=60, description="animate: frames per second of the clip.")
    motion_strength: float = Field(
        0.7, gt=0, le=1, description="animate: how far frames may move from the photo."
    )


class StylesConfig(_Strict):
    """configs/styles.yaml: the styles a request may name."""

    styles: dict[str, StyleConfig] = Field(min_length=1, description="Style name -> settings.")


class TransparencyConfig(_Strict):
    """retention.yaml transparency: the log of verified deletions (pipeline/transparency)."""

    origin: str = Field(
        "ephemera.app/deletions", min_length=1, pattern=r"^[^\s]+$",
        description="The log's name in its signed heads (C2SP checkpoint origin line).")
    signing_key_env: str = Field(
        "EPHEMERA_TLOG_SIGNING_KEY", pattern=r"^[A-Z][A-Z0-9_]*$",
        description="Variable holding the Ed25519 signing key (base64 of a 32-byte seed); "
        "required where the config is production-shaped.")
    public_key: str | None = Field(
        None, description="The key clients pin (base64, 32 bytes): processes refuse a "
        "signing key that does not match it. null: whatever the signing key is.")
    head_interval_s: float = Field(
        1.0, gt=0, le=3600, description="A new signed head at least this often while "
        "entries wait (a receipt's proof is pending at most this long).")
    head_max_entries: int = Field(
        1000, gt=0, le=10_000_000, description="...or as soon as this many entries wait.")
    head_settle_s: float = Field(
        2.0, ge=0, le=60, description="A head covers only entries at least this old: longer "
        "than Redis's AOF fsync interval (everysec), so no signed head outlives a crash's "
        "lost writes.")
    heads_kept: int = Field(
        10_000, gt=0, le=10_000_000, description="Signed heads kept in Redis for monitors "
        "and witnesses (older ones remain provable: proofs work between any sizes).")


class RetentionConfig(_Strict):
    """configs/retention.yaml: hard ceilings and the background sweep."""

    input_ceiling_h: float = Field(
        96.0, gt=0, le=96.0, description="Inputs are gone by this many hours (policy: 4 days)."
    )
    face_data_ceiling_h: float = Field(
        96.0, gt=0, le=96.0, description="Face crops/embeddings are gone by this many hours."
    )
    sweep_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often retention actors purge due objects."
    )
    lease_s: float = Field(
        30.0, gt=0, le=3600, description="A claimed purge not finished by then is re-claimed."
    )
    purge_max_attempts: int = Field(
        5, gt=0, le=20, description="Store retries per deletion before it is left to the sweep."
    )
    job_record_grace_s: float = Field(
        600.0, ge=0, le=7 * 86400, description="After a job's inputs are purged, the app has "
        "this long to read its full status; then the record loses its personal fields."
    )
    job_record_ttl_h: float = Field(
        720.0, gt=0, le=24 * 3650, description="Job records are deleted this long after "
        "their inputs were purged (outputs stay until the user deletes them)."
    )
    usage_ttl_days: float = Field(
        90.0, gt=0, le=3650, description="Usage data (Parquet under usage/) older than this "
        "is deleted, with receipts."
    )
    usage_min_group_size: int = Field(
        5, ge=2, le=1000, description="k: an aggregate group with fewer distinct accounts "
        "is suppressed (`ephemera usage aggregate`)."
    )
    reconcile_interval_s: float = Field(
        60.0, gt=0, le=86400, description="How often actors list the store for orphans."
    )
    transparency: TransparencyConfig = Field(
        default_factory=TransparencyConfig, description="The deletion transparency log: "
        "its name, signing key variable, pinned public key and head cadence.")


class Settings(_Strict):
    """All configs together, as one picklable value handed to every actor."""

    service: ServiceConfig = Field(default_factory=ServiceConfig, description="service.yaml")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="batching.yaml")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="models.yaml")
    styles: StylesConfig = Field(description="styles.yaml")
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig, description="retention.yaml"
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="storage.yaml")
    deployments: DeploymentsConfig = Field(
        default_factory=DeploymentsConfig, description="deployments.yaml"
    )

    @model_validator(mode="after")
    def _timeouts_fit(self) -> Settings:
        job_s, ceiling_s = self.service.job_timeout_s, self.retention.input_ceiling_h * 3600
        if job_s >= ceiling_s:
            raise ValueError(f"service.yaml job_timeout_s {job_s} must be shorter than "
                             f"retention.yaml input_ceiling_h ({ceiling_s} s), or the sweep "
                             "would delete the inputs of running jobs")
        tries_s = self.batching.stage_timeout_s * self.batching.max_attempts
        if tries_s > job_s:
            raise ValueError(f"batching.yaml stage_timeout_s x max_attempts ({tries_s} s) "
                             f"exceeds service.yaml job_timeout_s ({job_s} s); lower one")
        return self

    @model_validator(mode="after")
    def _largest_job_fits_a_batch(self) -> Settings:
        service, batching = self.service, self.batching
        side = max(service.allowed_resolutions_px) / batching.reference_resolution_px
        largest = max(1, math.ceil(service.max_files_per_job * side * side))
        chunk = max(1, math.ceil(batching.video_chunk_frames * side * side))
        if batching.diffusion.max_batch_cost < chunk:
            raise ValueError(
                f"batching.yaml diffusion.max_batch_cost {batching.diffusion.max_batch_cost} is "
                f"below the cost of one video chunk ({chunk}: video_chunk_frames "
                f"{batching.video_chunk_frames} at {max(service.allowed_resolutions_px)} px); "
                "raise it or lower video_chunk_frames")
        for name, pool in ((s.value, getattr(batching, s.value)) for s in Stage):
            if pool.max_batch_cost < largest:
                raise ValueError(
                    f"batching.yaml {name}.max_batch_cost {pool.max_batch_cost} is below the "
                    f"cost of the largest job ({largest}: max_files_per_job "
                    f"{service.max_files_per_job} at {max(service.allowed_resolutions_px)} px),"
                    " which could then never run; raise it")
        return self

    @model_validator(mode="after")
    def _simulation_never_serves_users(self) -> Settings:
        production = self.production_markers
        if self.models.diffusion_backend == "simulated" and production:
            raise ValueError("models.yaml diffusion_backend: simulated is a benchmark tool "
                             f"and is refused with {', '.join(production)} set; use "
                             "diffusers")
        return self

    @property
    def production_markers(self) -> list[str]:
        """What makes this config look like production (serving real users); empty for
        the embedded loopback demo."""
        service, storage = self.service, self.storage
        return [what for what, yes in (
            ("service.yaml api_token_env", service.api_token_env is not None),
            ("service.yaml ray_address", service.ray_address is not None),
            (f"storage.yaml inputs: {storage.inputs}", storage.inputs != "local"),
            (f"storage.yaml outputs: {storage.outputs}", storage.outputs != "local"),
            ("service.yaml redis_url", not is_loopback_redis(service.redis_url)),
            ("service.yaml http_host", service.http_host not in LOOPBACK_HOSTS),
        ) if yes]

    @model_validator(mode="after")
    def _fail_closed(self) -> Settings:
        """Anything that can reach real users or real data needs the API token. The same
        markers make every process that computes a pseudonym refuse to start without
        EPHEMERA_ACCOUNT_SECRET and EPHEMERA_AGGREGATE_SECRET (32+ characters each); those
        are read where the process starts (pipeline/state/cluster_secret.py), not here, as
        configs never read the environment."""
        exposed = [m for m in self.production_markers if m != "service.yaml api_token_env"]
        if exposed and self.service.api_token_env is None:
            raise ValueError(f"service.yaml api_token_env must name the API token's variable "
                             f"with {', '.join(exposed)} set; the service never runs open "
                             "beyond loopback")
        return self

    @model_validator(mode="after")
    def _models_pinned(self, info: ValidationInfo) -> Settings:
        """A production-shaped config serves only models pinned by sha256: a node then
        refuses weights someone changed in the bucket or on its disk. Skipped only where
        the caller loads settings without serving (``load_settings(require_pins=False)``)."""
        if not (info.context or {}).get("require_pins", True):
            return self
        production, models = self.production_markers, self.models
        if not production or models.diffusion_backend != "diffusers":
            return self
        missing = [f"{pin} (for {location} {getattr(models, location)})"
                   for location, pin in MODEL_PINS.items() if getattr(models, pin) is None]
        if missing:
            raise ValueError(
                f"models.yaml leaves {len(missing)} model(s) unpinned in a production config "
                f"({', '.join(production)} set): {'; '.join(missing)}. Stage each model with "
                "`ephemera models stage SRC DEST` (DEST: the location above; it prints the "
                "manifest sha256) and put that hash in the key named; the service refuses to "
                "start until every model is pinned")
        return self

    @model_validator(mode="after")
    def _every_style_denoises(self) -> Settings:
        steps = self.models.num_inference_steps
        for name, style in self.styles.styles.items():
            if int(steps * style.strength) < 1:
                raise ValueError(
                    f"styles.yaml {name}: strength {style.strength} x num_inference_steps "
                    f"{steps} runs no denoising step; raise either so the product is >= 1"
                )
        return self


M = TypeVar("M", bound=BaseModel)


def load_yaml(path: Path, model: type[M]) -> M:
    """Parse one YAML file into its model; errors name the file and the field."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} is missing") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_settings(config_dir: Path | str = CONFIG_DIR, *, require_pins: bool = True) -> Settings:
    """Load the seven config files from ``config_dir`` (relative: to ``APP_ROOT``).

    ``require_pins=False`` skips only the model-pin check of a production config, for
    callers that serve no model and must work before the models are staged and pinned
    (writing the Serve config, staging models, retention and status commands, checking a
    tune); whatever starts the service loads with the check.
    """
    root = resolve_path(config_dir)
    return Settings.model_validate(dict(
        service=load_yaml(root / "service.yaml", ServiceConfig),
        batching=load_yaml(root / "batching.yaml", BatchingConfig),
        models=load_yaml(root / "models.yaml", ModelsConfig),
        styles=load_yaml(root / "styles.yaml", StylesConfig),
        retention=load_yaml(root / "retention.yaml", RetentionConfig),
        storage=load_yaml(root / "storage.yaml", StorageConfig),
        deployments=load_yaml(root / "deployments.yaml", DeploymentsConfig),
    ), context=None if require_pins else UNPINNED_OK)


def resolve_path(path: Path | str) -> Path:
    """The one rule for a path the app is given (``--config-dir``, ``args.config_dir``,
    paths inside the configs): absolute as given, relative to ``APP_ROOT`` otherwise, never
    to the current directory."""
    p = Path(path)
    return p if p.is_absolute() else APP_ROOT / p


def portable_path(path: Path | str) -> str:
    """``path`` as a file meant for other machines names it: relative to ``APP_ROOT``
    (POSIX separators) when it lies under it, else absolute (only valid on this machine)."""
    full = resolve_path(path).resolve()
    try:
        return full.relative_to(APP_ROOT).as_posix()
    except ValueError:
        return str(full)
