"""Sanity check of FID with the shapes features: renderer vs renderer (another seed) must be low, blurred high.

Reference: the first N images of ``training_stream(seed=0)`` (32x32). Compared sets, N images each:

* ``same images``: the reference images themselves (FID ~ 0);
* ``renderer, seed 1``: the first N images of ``training_stream(seed=1)`` (the noise floor at this N);
* ``renderer, seed 1, blur r=1``: the same images through PIL ``GaussianBlur(radius=1)``;
* ``renderer, seed 1, blur r=0.5``: a milder blur, to show the score grows with the damage.

Run (CPU, 1 thread, about 30 s):

    PYTHONPATH=. python bench/fid_sanity.py [--n-images 1000 200] [--out bench/results/fid_sanity.json]

Reference statistics go to a temporary cache, so every run measures a cold start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from rich.console import Console
from rich.table import Table

from apex_cli.data.shapes import training_stream
from apex_cli.eval import fid


def renderer_images(seed: int, n_images: int) -> list[np.ndarray]:
    """The first ``n_images`` images of ``training_stream(seed)`` at 32x32."""
    return [image for _, image in itertools.islice(training_stream(seed, size=32), n_images)]


def blurred(images: list[np.ndarray], radius: float) -> list[np.ndarray]:
    """Each image through PIL ``GaussianBlur(radius)``."""
    return [np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))) for image in images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, nargs="+", default=[1000, 200])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fid_sanity.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="apex-fid-sanity-") as tmp:
        os.environ["APEX_CACHE_DIR"] = str(Path(tmp) / "cache")
        extractor = fid.load_feature_extractor("shapes")
        for n_images in args.n_images:
            reference = fid.shapes_reference(seed=0, n_images=n_images)
            other_seed = renderer_images(1, n_images)
            compared = {
                "same images": renderer_images(0, n_images),
                "renderer, seed 1": other_seed,
                "renderer, seed 1, blur r=1": blurred(other_seed, 1.0),
                "renderer, seed 1, blur r=0.5": blurred(other_seed, 0.5),
            }
            for comparison, images in compared.items():
                folder = Path(tmp) / f"{n_images}-{len(rows)}"
                fid.save_png_images(images, folder)
                start = time.perf_counter()
                result = fid.compute_fid(folder, reference, features=extractor)
                rows.append(
                    {
                        "comparison": comparison,
                        "n_images": result.n_images,
                        "n_ref_images": result.n_ref_images,
                        "fid": result.fid,
                        "kid": result.kid,
                        "mode": result.mode,
                        "ref_name": result.ref_name,
                        "ref_hash": result.ref_hash,
                        "features": result.features,
                        "feature_hash": result.feature_hash,
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                )

    report = {
        "description": "FID/KID with the shapes feature network; reference = training_stream(seed=0), 32x32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"FID sanity (shapes features #{rows[0]['feature_hash']}, mode {rows[0]['mode']})")
    for column in ("comparison", "N", "reference", "FID", "KID", "s"):
        table.add_column(column, justify="left" if column in ("comparison", "reference") else "right")
    for row in rows:
        table.add_row(
            row["comparison"],
            str(row["n_images"]),
            f"{row['ref_name']} #{row['ref_hash']}",
            f"{row['fid']:.4f}",
            f"{row['kid']:.6f}",
            f"{row['seconds']:.1f}",
        )
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
