"""Offline evaluation (pipeline/jobs/evaluation.py) without Ray or models: the identity
metric on known vectors, the three steps with fake models, the manifest's checks (above
all: no image from a store of users' media), the tables between steps and the summary."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.config import (
    APP_ROOT,
    AutoscalingConfig,
    GcsConfig,
    PoolConfig,
    S3Config,
    StorageConfig,
)
from pipeline.core.records import JobKind
from pipeline.jobs.evaluation import (
    MANIFEST_SCHEMA,
    RESULT_SCHEMA,
    EvalImage,
    EvalItem,
    EvalPool,
    EvalWorkers,
    check_manifest,
    generate_images,
    identify_images,
    identity_similarity,
    items_from_table,
    items_to_table,
    manifest_table,
    render_summary,
    results_table,
    score_images,
    summarize,
)
from pipeline.jobs.stages import face_failure_reason, identify_jobs
from pipeline.media.ingest import encode_png
from pipeline.models.faces import ARCFACE_TEMPLATE_PX, EMBEDDING_DIM, Detection, FaceQuality
from tests.unit.factories import make_settings

ANY_QUALITY = FaceQuality(min_eye_distance_px=0, min_sharpness=0)
NO_FACE = 0  # a flat image of this value holds no face for FakeDetector


def unit(*values: float) -> np.ndarray:
    vector = np.zeros(EMBEDDING_DIM, np.float32)
    vector[: len(values)] = values
    return vector


# Each flat grey value stands for one face; FakeEmbedder knows its embedding.
FACES = {10: unit(1.0), 20: unit(0.6, 0.8), 30: unit(0.0, 1.0), 40: unit(-1.0)}


def flat(value: int, side: int = 112) -> np.ndarray:
    return np.full((side, side, 3), value, np.uint8)


class FakeDetector:
    """A face in every flat image but value 0 (and any value in ``blind``), its landmarks on
    the ArcFace template scaled to the image, so the aligned crop is the image itself."""

    def __init__(self, blind: frozenset[int] = frozenset()) -> None:
        self.blind = blind
        self.calls = 0

    def detect(self, images: list[np.ndarray]) -> list[Detection | None]:
        self.calls += 1
        found: list[Detection | None] = []
        for image in images:
            value = int(image[0, 0, 0])
            scale = image.shape[0] / 112
            found.append(None if value in self.blind | {NO_FACE} else Detection(
                (0, 0, image.shape[1], image.shape[0]), ARCFACE_TEMPLATE_PX * scale, 0.99))
        return found


class FakeEmbedder:
    def __init__(self) -> None:
        self.calls = 0

    def embed(self, crops: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.stack([FACES[int(crop[56, 56, 0])] for crop in crops])


class FakeGenerator:
    """Records every call; output n of a call is a flat image of the value its seed names."""

    def __init__(self, fail_on_seed: int | None = None) -> None:
        self.calls: list[tuple[str, str, int, list[int]]] = []
        self.fail_on_seed = fail_on_seed

    def _make(self, kind: str, params, seeds: list[int]) -> np.ndarray:
        self.calls.append((kind, params.prompt, params.resolution_px, list(seeds)))
        if self.fail_on_seed in seeds:
            raise RuntimeError("the model broke")
        return np.stack([flat(seed % 256, params.resolution_px) for seed in seeds])

    def ai_photos(self, face_embeddings, params, seeds):
        assert face_embeddings.shape == (len(seeds), EMBEDDING_DIM)
        return self._make("ai_photo", params, seeds)

    def art_styles(self, images, params, seeds):
        return self._make("art_style", params, seeds)

    def clip(self, frames, params, seed, size_px):
        raise AssertionError("clips are not evaluated")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image(image_id: str, value: int = 10, *, kind: str = "ai_photo", num_outputs: int = 1,
          seed: int = 10) -> EvalImage:
    return EvalImage(image_id, JobKind(kind), "portrait", 64, seed=seed,
                     num_outputs=num_outputs, image_bytes=png(flat(value)))


# ---------------------------------------------------------------- the metric

def test_identity_similarity_is_the_cosine_per_output_with_its_mean_and_min():
    source = unit(1.0)
    outputs = np.stack([unit(1.0), unit(0.6, 0.8), unit(0.0, 1.0), unit(-1.0)])
    score = identity_similarity(source, outputs)
    assert score.similarities == pytest.approx((1.0, 0.6, 0.0, -1.0))
    assert score.mean == pytest.approx(0.15)
    assert score.min == pytest.approx(-1.0)


def test_identity_similarity_does_not_need_normalised_vectors():
    score = identity_similarity(unit(3.0, 4.0), np.stack([unit(30.0, 40.0), unit(-4.0, 3.0)]))
    assert score.similarities == pytest.approx((1.0, 0.0), abs=1e-12)


def test_a_zero_embedding_scores_zero_not_nan():
    score = identity_similarity(unit(1.0), np.stack([np.zeros(EMBEDDING_DIM, np.float32)]))
    assert score.similarities == (0.0,)


def test_an_image_with_no_outputs_has_no_score():
    score = identity_similarity(unit(1.0), np.zeros((0, EMBEDDING_DIM), np.float32))
    assert score.similarities == () and score.mean is None and score.min is None


# ---------------------------------------------------------------- the shared face step

def test_identify_jobs_averages_a_jobs_photos_and_names_its_first_photo_without_a_face():
    found = identify_jobs(["a", "b"], [[flat(10), flat(30)], [flat(10), flat(NO_FACE)]],
                          FakeDetector(), FakeEmbedder(), ANY_QUALITY)
    expected = (FACES[10] + FACES[30]) / np.linalg.norm(FACES[10] + FACES[30])
    np.testing.assert_allclose(found[0], expected, rtol=1e-6)
    assert found[1] == face_failure_reason(2, None)
    assert found[1].startswith("file 2: no human face was found")


# ---------------------------------------------------------------- the three steps

def test_the_three_steps_score_each_output_against_its_source_identity():
    detector, embedder, generator = FakeDetector(blind=frozenset({20})), FakeEmbedder(), \
        FakeGenerator()
    settings = make_settings()
    items = [EvalItem(image("two", 10, num_outputs=2, seed=10)),   # outputs 10 and 11 -> 10, 20
             EvalItem(image("cat", NO_FACE, seed=30)),
             EvalItem(image("styled", 10, kind="art_style", seed=40))]
    FACES[11] = FACES[20]  # the second output of "two" holds face 20 (seed 10 + 1 = 11)
    try:
        identified = identify_images(items, _no_reads, settings.service, detector, embedder,
                                     ANY_QUALITY)
        made = generate_images(identified, generator, settings)
        scored = score_images(made, FakeDetector(blind=frozenset({11})), embedder)
    finally:
        del FACES[11]
    two, cat, styled = scored
    assert two.similarities == pytest.approx((1.0, 0.6)) and two.num_output_faces == 1
    assert cat.reason == face_failure_reason(1, None) and cat.similarities == ()
    assert styled.reason is None and styled.similarities == pytest.approx((-1.0,))
    assert all(it.seconds > 0 for it in scored)
    kinds = sorted((kind, seeds) for kind, _, _, seeds in generator.calls)
    assert kinds == [("ai_photo", [10, 11]), ("art_style", [40])]


def test_an_art_style_photo_without_a_face_is_generated_but_not_scored():
    settings = make_settings()
    [item] = identify_images([EvalItem(image("scene", NO_FACE, kind="art_style"))],
                             _no_reads, settings.service, FakeDetector(), FakeEmbedder(),
                             ANY_QUALITY)
    assert item.reason is None and item.identity is None
    [made] = generate_images([item], FakeGenerator(), settings)
    [scored] = score_images([made], FakeDetector(), FakeEmbedder())
    assert len(made.output_pngs) == 1 and scored.similarities == ()


def test_an_unreadable_image_fails_with_the_services_upload_reason():
    settings = make_settings()
    broken = EvalImage("broken", JobKind.AI_PHOTO, "portrait", 64, seed=1,
                       image_bytes=b"not an image")
    [item] = identify_images([EvalItem(broken)], _no_reads, settings.service, FakeDetector(),
                             FakeEmbedder(), ANY_QUALITY)
    assert item.reason is not None and item.reason.startswith("file 1 is not a readable image")


def test_generation_is_batched_by_key_and_cut_at_the_cost_limit():
    settings = make_settings()
    settings = settings.model_copy(update={"batching": settings.batching.model_copy(update={
        "diffusion": settings.batching.diffusion.model_copy(update={"max_batch_cost": 3})})})
    items = [EvalItem(image(f"i{n}", 10, seed=100 * n), identity=FACES[10]) for n in range(4)]
    items.append(EvalItem(image("big", 10, num_outputs=3, seed=7), identity=FACES[10]))
    generator = FakeGenerator()
    made = generate_images(items, generator, settings)
    assert [seeds for *_, seeds in generator.calls] == [[0, 100, 200], [300], [7, 8, 9]]
    assert [len(it.output_pngs) for it in made] == [1, 1, 1, 1, 3]


def test_a_batch_that_raises_is_retried_image_by_image():
    items = [EvalItem(image(f"i{n}", 10, seed=n), identity=FACES[10]) for n in range(3)]
    made = generate_images(items, FakeGenerator(fail_on_seed=1), make_settings())
    assert [it.reason for it in made] == [None, "this photo could not be processed", None]
    assert [len(it.output_pngs) for it in made] == [1, 0, 1]


def _no_reads(uri: str) -> bytes:
    raise AssertionError(f"nothing should be read: {uri}")


# ---------------------------------------------------------------- the manifest

def manifest(**columns: list) -> pa.Table:
    n = len(next(iter(columns.values())))
    base = {"image_id": [f"img{i}" for i in range(n)], "kind": ["ai_photo"] * n,
            "style": ["portrait"] * n}
    return pa.table({**base, **columns})


def test_a_manifest_row_gets_the_documented_defaults(tmp_path):
    [row] = check_manifest(manifest(image_uri=["photo.png"]), make_settings(),
                           base_dir=tmp_path)
    assert row.image_uri == f"file://{tmp_path / 'photo.png'}"
    assert (row.resolution_px, row.num_outputs) == (64, 1)
    assert row.seed == zlib.crc32(b"img0") & 0x7FFFFFFF


@pytest.mark.parametrize("uri", [
    f"file://{APP_ROOT}/data/store/inputs/job1/object.bin",
    f"file:///tmp/../{APP_ROOT}/data/store/inputs/job1/object.bin",
    f"{APP_ROOT}/data/store/face/job1/object.bin",
])
def test_an_image_in_the_local_input_store_is_refused(tmp_path, uri):
    with pytest.raises(ValueError, match="production input store") as refused:
        check_manifest(manifest(image_uri=[uri]), make_settings(), base_dir=tmp_path)
    assert f"{APP_ROOT}/data/store" in str(refused.value) and "img0" in str(refused.value)


def test_a_relative_path_cannot_climb_into_the_input_store():
    inside = APP_ROOT / "data" / "eval"
    with pytest.raises(ValueError, match="production input store"):
        check_manifest(manifest(image_uri=["../store/inputs/j/x.bin"]), make_settings(),
                       base_dir=inside)


def cloud_settings():
    return make_settings().model_copy(update={"storage": StorageConfig(
        inputs="gcs", outputs="s3",
        s3=S3Config(bucket="eph-outputs-us", region="us-east-1"),
        gcs=GcsConfig(project="p", buckets={"us-central1": "eph-in-usc1",
                                            "europe-west1": "eph-in-euw1"},
                      fallback_region="us-central1"))})


@pytest.mark.parametrize("uri, bucket, holds", [
    ("gs://eph-in-usc1/inputs/job1/object.bin", "eph-in-usc1", "production input bucket"),
    ("gs://eph-in-euw1/anything.png", "eph-in-euw1", "production input bucket"),
    ("s3://eph-outputs-us/outputs/acct/out.png", "eph-outputs-us", "production output bucket"),
])
def test_an_image_in_a_production_bucket_is_refused_naming_the_bucket(tmp_path, uri, bucket,
                                                                      holds):
    with pytest.raises(ValueError, match=holds) as refused:
        check_manifest(manifest(image_uri=[uri]), cloud_settings(), base_dir=tmp_path)
    assert f"lies in {bucket}" in str(refused.value)


def test_an_s3_input_bucket_is_refused_and_another_bucket_is_not(tmp_path):
    settings = make_settings().model_copy(update={"storage": StorageConfig(
        inputs="s3", outputs="s3", s3=S3Config(bucket="eph-in-us", region="us-east-1"))})
    with pytest.raises(ValueError, match="lies in eph-in-us, the production input bucket"):
        check_manifest(manifest(image_uri=["s3://eph-in-us/inputs/j/x.bin"]), settings,
                       base_dir=tmp_path)
    [row] = check_manifest(manifest(image_uri=["s3://eph-in-us-eval/faces/a.png"]), settings,
                           base_dir=tmp_path)
    assert row.image_uri == "s3://eph-in-us-eval/faces/a.png"


@pytest.mark.parametrize("columns, message", [
    ({"image_uri": ["a.png"], "notes": ["x"]}, "unknown"),
    ({"image_uri": ["a.png"], "kind": ["animate"]}, "clips are not evaluated"),
    ({"image_uri": ["a.png"], "style": ["cubist"]}, "style 'cubist' is unknown"),
    ({"image_uri": ["a.png"], "resolution_px": [512]}, "resolution_px 512 is not offered"),
    ({"image_uri": ["a.png"], "num_outputs": [0]}, "num_outputs 0 must be 1 to 16"),
    ({"image_uri": ["a.png"], "image_bytes": [b"x"]}, "exactly one of image_uri"),
    ({"image_uri": [None]}, "exactly one of image_uri"),
    ({"image_uri": ["a.png", "b.png"], "image_id": ["same", "same"]}, "appears twice"),
    ({"image_uri": ["http://example.com/a.png"]}, "is not file://, s3:// or gs://"),
    ({"image_uri": ["file://relative/a.png"]}, "not an absolute file:// URI"),
    ({"image_uri": ["s3://bucket-only"]}, "names no object"),
    ({"image_uri": ["a.png"], "num_outputs": ["two"]}, "column num_outputs is string"),
])
def test_a_bad_manifest_is_refused_saying_what_to_fix(tmp_path, columns, message):
    with pytest.raises(ValueError, match=message):
        check_manifest(manifest(**columns), make_settings(), base_dir=tmp_path)


def test_a_manifest_without_an_image_column_is_refused(tmp_path):
    with pytest.raises(ValueError, match="image_uri or image_bytes"):
        check_manifest(pa.table({"image_id": ["a"], "kind": ["ai_photo"],
                                 "style": ["portrait"]}), make_settings(), base_dir=tmp_path)


def test_the_manifest_schema_round_trips_through_parquet(tmp_path):
    rows = [image("a", 10, num_outputs=2), EvalImage("b", JobKind.ART_STYLE, "portrait", 64,
                                                     seed=3, image_uri="file:///x/b.png")]
    pq.write_table(manifest_table(rows), tmp_path / "m.parquet")
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert check_manifest(table, make_settings(), base_dir=tmp_path) == rows


# ---------------------------------------------------------------- tables and summary

def test_items_round_trip_through_the_table_between_steps():
    item = EvalItem(image("a", 10, num_outputs=2), source_png=encode_png(flat(10)),
                    identity=FACES[20], output_pngs=(b"p1", b"p2"), similarities=(0.5, 0.25),
                    num_output_faces=1, reason=None, seconds=1.5)
    [back] = items_from_table(items_to_table([item]))
    assert back.image == item.image and back.output_pngs == item.output_pngs
    np.testing.assert_array_equal(back.identity, item.identity)
    assert (back.similarities, back.num_output_faces, back.seconds) == ((0.5, 0.25), 1, 1.5)


def results_of(*rows: tuple[str, str | None, tuple[float, ...]]) -> pa.Table:
    return results_table([EvalItem(image(name), similarities=sims, reason=reason, seconds=1.0)
                          for name, reason, sims in rows])


def test_results_round_trip_through_parquet_with_their_schema(tmp_path):
    table = results_of(("a", None, (0.5, 0.25)), ("b", "no face", ()))
    pq.write_table(table, tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.schema.equals(RESULT_SCHEMA) and back.to_pylist() == table.to_pylist()
    a, b = back.to_pylist()
    assert (a["identity_similarity_mean"], a["identity_similarity_min"]) == (0.375, 0.25)
    assert b["identity_similarity_mean"] is None and b["failure_reason"] == "no face"


def test_the_summary_gives_failure_rate_percentiles_and_throughput_per_worker():
    table = results_of(*[(f"i{n}", None, (n / 10,)) for n in range(1, 10)],
                       ("cat", "no face", ()))
    pool = EvalPool(1, 1, 0.5, 0.0)
    summary = summarize(table, wall_s=5.0, workers=EvalWorkers(pool, pool))
    assert (summary.num_images, summary.num_failed, summary.failure_rate) == (10, 1, 0.1)
    assert summary.similarity_p10 == pytest.approx(0.18)
    assert summary.similarity_p50 == pytest.approx(0.5)
    assert summary.images_per_s == 2.0
    text = render_summary(summary)
    assert "failure rate 10.0%" in text and "p10 0.180, p50 0.500" in text
    assert "0.667 images/s per CPU worker" in text and "failed x1: no face" in text


def test_eval_pools_follow_deployments_and_request_gpus_only_where_there_is_one():
    fixed = PoolConfig(num_replicas=3, num_cpus=1.0, num_gpus=0.5)
    scaled = PoolConfig(autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=4),
                        num_gpus=1.0)
    assert EvalPool.of(fixed, gpu_present=True) == EvalPool(3, 3, 1.0, 0.5)
    assert EvalPool.of(fixed, gpu_present=False) == EvalPool(3, 3, 1.0, 0.0)
    assert EvalPool.of(scaled, gpu_present=True) == EvalPool(1, 4, 1.0, 1.0)
    workers = EvalWorkers(EvalPool.of(fixed, gpu_present=True),
                          EvalPool.of(scaled, gpu_present=True))
    assert (workers.num_gpus, workers.count, workers.label) == (7.0, 7, "GPU")
