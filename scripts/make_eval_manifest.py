"""Write the sample evaluation set: real photos that ship in scikit-image, and its manifest.

Run:  .venv/bin/python scripts/make_eval_manifest.py [--out DIR]     (default: data/eval-sample)
then: .venv/bin/ephemera eval DIR/manifest.parquet --out DIR/results.parquet

Writes DIR/*.png and DIR/manifest.parquet (pipeline/jobs/evaluation.py, MANIFEST_SCHEMA),
five rows that cover both image sources and both kinds:

    astronaut             ai_photo  portrait    file:// URI, 2 outputs (mean and min differ)
    astronaut-watercolor  art_style watercolor  file:// URI (the same photo, styled)
    cameraman-closeup     ai_photo  portrait    file:// URI (skimage's camera, cropped to
                                                the face and enlarged: the full photo's face
                                                is under the service's 20 px eye distance)
    lfw-face              ai_photo  portrait    inline image_bytes (a 25x25 face of
                                                skimage's lfw_subset, enlarged to 200 px)
    chelsea-cat           ai_photo  portrait    file:// URI; no human face: it fails with
                                                the service's reason

data/ is git-ignored: the images are written, never committed.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.records import JobKind  # noqa: E402
from pipeline.jobs.evaluation import EvalImage, manifest_table  # noqa: E402

DEFAULT_OUT = REPO / "data" / "eval-sample"
NO_FACE_ID = "chelsea-cat"


def sample_photos() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 RGB."""
    camera = np.stack([skimage.data.camera()] * 3, axis=-1)
    closeup = Image.fromarray(camera[40:296, 100:356]).resize((512, 512), Image.Resampling.BICUBIC)
    lfw = np.load(Path(skimage.data.__file__).parent / "lfw_subset.npy")[0]  # faces come first
    face = Image.fromarray((lfw * 255).astype(np.uint8)).resize((200, 200),
                                                                Image.Resampling.BICUBIC)
    return {"astronaut": skimage.data.astronaut(), "cameraman-closeup": np.asarray(closeup),
            "lfw-face": np.asarray(face.convert("RGB")), NO_FACE_ID: skimage.data.chelsea()}


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_sample(out_dir: Path) -> Path:
    """Write the images and the manifest under ``out_dir``; returns the manifest's path."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    uris = {}
    for name in ("astronaut", "cameraman-closeup", NO_FACE_ID):
        path = out_dir / f"{name}.png"
        path.write_bytes(png_bytes(photos[name]))
        uris[name] = f"file://{path}"
    ai, art = JobKind.AI_PHOTO, JobKind.ART_STYLE
    rows = [
        EvalImage("astronaut", ai, "portrait", 64, seed=1, num_outputs=2,
                  image_uri=uris["astronaut"]),
        EvalImage("astronaut-watercolor", art, "watercolor", 64, seed=2,
                  image_uri=uris["astronaut"]),
        EvalImage("cameraman-closeup", ai, "portrait", 64, seed=3,
                  image_uri=uris["cameraman-closeup"]),
        EvalImage("lfw-face", ai, "portrait", 64, seed=4,
                  image_bytes=png_bytes(photos["lfw-face"])),
        EvalImage(NO_FACE_ID, ai, "portrait", 64, seed=5, image_uri=uris[NO_FACE_ID]),
    ]
    manifest = out_dir / "manifest.parquet"
    pq.write_table(manifest_table(rows), manifest)
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write")
    args = parser.parse_args()
    manifest = write_sample(args.out)
    print(f"wrote {manifest} (5 images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
