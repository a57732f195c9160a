"""Write the example's inputs from a bundle and two image folders (device runtime, no TensorFlow).

    python examples/c/make_inputs.py BUNDLE.eab QUERY_IMAGE NEW_CLASS_FOLDER OUT_DIR [BACKGROUND_FOLDER]

writes OUT_DIR/head.eah (the bundle's head), OUT_DIR/query.f32 (the query image's embedding),
OUT_DIR/shots.f32 (the embeddings of the images in NEW_CLASS_FOLDER, at most 32) and, with
BACKGROUND_FOLDER, OUT_DIR/background.f32 (embeddings of the images under it, at most 256:
other things the device sees, which the new class should not claim).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from edgeadapt.device import Bundle, Runtime
from edgeadapt.device.head_file import write_head_file
from PIL import Image


def images_in(folder: str | Path, limit: int) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".bmp"}
    return sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in suffixes)[:limit]


def main(bundle_path: str, query: str, folder: str, out_dir: str, background: str | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.open(bundle_path)
    write_head_file(out / "head.eah", bundle.load_head(), bundle.manifest.class_names)
    with Runtime.open(bundle_path) as runtime:
        runtime.embed([Image.open(query).convert("RGB")]).astype("<f4").tofile(out / "query.f32")
        shots = runtime.embed([Image.open(path).convert("RGB") for path in images_in(folder, 32)])
        np.asarray(shots, dtype="<f4").tofile(out / "shots.f32")
        if background:
            others = runtime.embed([Image.open(path).convert("RGB") for path in images_in(background, 256)])
            np.asarray(others, dtype="<f4").tofile(out / "background.f32")
    print(f"wrote {out}/head.eah, query.f32 and shots.f32 ({len(shots)} shots)")


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    main(*sys.argv[1:])
