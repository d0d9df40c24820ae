"""``ephemera eval`` on Ray Data: read the manifest, run the three steps of
pipeline/jobs/evaluation.py in actor pools sized like the Serve pools, write the results.

    read_parquet(MANIFEST) -> map_batches(IdentifyActor)   face pool: read, check, identify
                           -> map_batches(GenerateActor)   diffusion pool: generate
                           -> map_batches(ScoreActor)      face pool: score the outputs
                           -> RESULTS.parquet (one row per manifest row, in manifest order)

Each actor loads its models once, with the loaders the Serve replicas use
(``open_face_models``, ``open_pool_generator``), and calls one pipeline function per batch.
Pool sizes, CPUs and GPUs come from deployments.yaml (``face``, ``diffusion``): a fixed
``num_replicas`` or the autoscaling range; GPUs, fractional ones included, are requested
only where the cluster has one. Batches hold batching.yaml's ``max_batch_cost`` images.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.core.config import Settings
from pipeline.jobs.evaluation import (
    RESULT_SCHEMA,
    EvalItem,
    EvalPool,
    EvalSummary,
    EvalWorkers,
    check_manifest,
    generate_images,
    identify_images,
    image_reader,
    items_from_table,
    items_to_table,
    results_table,
    score_images,
    summarize,
)


def _pin_threads(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.models.torch_num_threads)  # as every Serve replica does


class _FaceWorker:
    def __init__(self, settings: Settings) -> None:
        from pipeline.models.loading import face_quality, open_face_models

        _pin_threads(settings)
        self.settings = settings
        self.detector, self.embedder = open_face_models(settings)
        self.quality = face_quality(settings.models)


class IdentifyActor(_FaceWorker):
    """Step 1 on the face pool: manifest rows in, items with their identity out."""

    def __init__(self, settings: Settings, base_dir: str) -> None:
        super().__init__(settings)
        self.base_dir = Path(base_dir)
        self.read = image_reader(settings.storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [EvalItem(image) for image in check_manifest(batch, self.settings,
                                                             base_dir=self.base_dir)]
        return items_to_table(identify_images(items, self.read, self.settings.service,
                                              self.detector, self.embedder, self.quality))


class GenerateActor:
    """Step 2 on the diffusion pool."""

    def __init__(self, settings: Settings) -> None:
        from pipeline.models.loading import open_pool_generator

        _pin_threads(settings)
        self.settings = settings
        self.generator = open_pool_generator(settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return items_to_table(generate_images(items_from_table(batch), self.generator,
                                              self.settings))


class ScoreActor(_FaceWorker):
    """Step 3 on the face pool: items in, result rows out."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return results_table(score_images(items_from_table(batch), self.detector,
                                          self.embedder))


def map_options(pool: EvalPool) -> dict:
    """``map_batches`` keywords of one step: its actor pool and each actor's resources."""
    options: dict = {"compute": ray.data.ActorPoolStrategy(min_size=pool.min_size,
                                                           max_size=pool.max_size),
                     "num_cpus": pool.num_cpus}
    if pool.num_gpus:
        options["num_gpus"] = pool.num_gpus
    return options


def run_eval(manifest: Path, out: Path, settings: Settings) -> EvalSummary:
    """Evaluate every image of ``manifest`` and write the results to ``out`` (Parquet).

    Checks the whole manifest first (refusing, before any work, images in stores of users'
    media). Runs on the Ray this process is connected to, or starts a local one for the
    run (and stops it after). Returns the summary; the wall time counts from the first
    read to the last result, actor starts and model loads included.
    """
    manifest = manifest.resolve()
    if not manifest.is_file():
        raise ValueError(f"manifest {manifest} does not exist; write one (scripts/"
                         "make_eval_manifest.py writes a sample)")
    base_dir = manifest.parent
    images = check_manifest(pq.read_table(manifest), settings, base_dir=base_dir)
    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
        # As the service's local Ray: service.yaml's logical CPUs (accounting only), so
        # the pools' reservations and Ray Data's own file listing and reading all fit.
        ray.init(address="local", num_cpus=settings.service.ray_num_cpus,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        gpu_present = ray.cluster_resources().get("GPU", 0) > 0
        face = EvalPool.of(settings.deployments.face, gpu_present=gpu_present)
        diffusion = EvalPool.of(settings.deployments.diffusion, gpu_present=gpu_present)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the summary says the rest
        began = time.perf_counter()
        # Reading a manifest is light: it must not hold a CPU the model pools need.
        data = ray.data.read_parquet(str(manifest), num_cpus=0.1)
        data = data.map_batches(
            IdentifyActor, fn_constructor_kwargs={"settings": settings, "base_dir": str(base_dir)},
            batch_size=settings.batching.face.max_batch_cost, batch_format="pyarrow",
            **map_options(face))
        data = data.map_batches(
            GenerateActor, fn_constructor_kwargs={"settings": settings},
            batch_size=settings.batching.diffusion.max_batch_cost, batch_format="pyarrow",
            **map_options(diffusion))
        data = data.map_batches(
            ScoreActor, fn_constructor_kwargs={"settings": settings},
            batch_size=settings.batching.face.max_batch_cost, batch_format="pyarrow",
            **map_options(face))
        tables = list(data.iter_batches(batch_size=None, batch_format="pyarrow"))
        wall_s = time.perf_counter() - began
    finally:
        if started_ray:
            ray.shutdown()
    results = (pa.concat_tables(tables) if tables else results_table([])).cast(RESULT_SCHEMA)
    order = {image.image_id: n for n, image in enumerate(images)}
    if sorted(results["image_id"].to_pylist()) != sorted(order):
        raise RuntimeError(f"the evaluation returned {results.num_rows} rows for "
                           f"{len(images)} manifest rows")
    results = results.take(sorted(range(results.num_rows),
                                  key=lambda n: order[results["image_id"][n].as_py()]))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(results, out)
    return summarize(results, wall_s, EvalWorkers(face, diffusion))
