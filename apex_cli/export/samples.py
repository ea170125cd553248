"""`apex sample`: images of prompts from a checkpoint or an export, as PNGs, a grid and a manifest.

Output folder::

    <prompt:03d>-<k:02d>.png   image k of each prompt (seed = --seed + prompt index * n + k)
    grid.png                   one row per prompt, one column per image
    manifest.json              per image: file, prompt, seed, nfe; the sampler settings used (time grid included),
                               the model's source and the SHA-256 of its weights files

The folder is written beside itself and renamed into place when complete. An existing folder is replaced only when it
holds an earlier `apex sample` manifest (or nothing); anything else is refused, so no user file is ever deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apex_cli import __version__
from apex_cli.core.sampler import SamplerSettings
from apex_cli.errors import DataError
from apex_cli.export.files import occupied, publish, staging_folder
from apex_cli.export.loading import LoadedModel, settings_record

NO_PROMPTS = "no prompts: give them as arguments or in a file with --prompts-file (one a line)"
MANIFEST = "manifest.json"
GRID = "grid.png"
TOOL = "apex sample"


@dataclass(frozen=True)
class SampleResult:
    """What `apex sample` wrote."""

    out: Path
    images: int
    grid: Path
    manifest: Path
    seconds: float
    """Wall time of generation and writing, model loading excluded."""


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a text file, one a line; blank lines are skipped.

    Raises:
        DataError: The file cannot be read.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read the prompt file {path}: {err.strerror or err}") from None
    return [line.strip() for line in lines if line.strip()]


def check_prompts(model: object, prompts: Sequence[str]) -> None:
    """Refuse an empty prompt list, or a prompt the model cannot read, before anything is drawn.

    Raises:
        DataError: No prompts, or a word outside the vocabulary (named), or a prompt too long.
    """
    if not prompts:
        raise DataError(NO_PROMPTS)
    model.tokenize(list(prompts))  # type: ignore[attr-defined]


def check_size(model: object, height: int | None, width: int | None) -> None:
    """Refuse a size the model does not generate at (the shapes model: its training size only).

    Raises:
        DataError: ``height`` or ``width`` differs from the model's image size.
    """
    size = model.image_size  # type: ignore[attr-defined]
    if (height or size) != size or (width or size) != size:
        raise DataError(
            f"--height {height or size} --width {width or size}: this shapes model generates {size} x {size} images "
            "only, the size it was trained at",
            hint=f"leave out --height and --width (or pass {size})",
        )


def write_samples(
    loaded: LoadedModel,
    prompts: Sequence[str],
    images_per_prompt: int,
    seed: int,
    settings: SamplerSettings,
    out: Path,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> SampleResult:
    """Generate ``images_per_prompt`` images of every prompt and write them, the grid and the manifest to ``out``.

    Args:
        loaded: The model and where it came from.
        prompts: The prompts (validated against the model's vocabulary before anything is generated).
        images_per_prompt: Images a prompt.
        seed: Seed of the first image; image ``k`` of prompt ``i`` has seed ``seed + i * images_per_prompt + k``.
        settings: The sampler settings.
        out: The output folder.
        batch_size: Images a forward batch (an image's noise does not depend on it; float rounding may).
        progress: Called as ``progress(done, total)`` after each batch.

    Raises:
        DataError: No prompts, a prompt outside the vocabulary, or ``out`` holds other files or cannot be written.
    """
    from PIL import Image

    from apex_cli.eval.generate import generate

    check_prompts(loaded.model, prompts)
    entries = [
        {
            "file": f"{i:03d}-{k:02d}.png",
            "prompt": prompt,
            "seed": seed + i * images_per_prompt + k,
            "nfe": settings.nfe,
        }
        for i, prompt in enumerate(prompts)
        for k in range(images_per_prompt)
    ]
    staging = _staging_folder(out)
    try:
        started = time.perf_counter()
        pixels: list[np.ndarray] = []
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            pixels.extend(generate(loaded.model, [e["prompt"] for e in batch], [e["seed"] for e in batch], settings))
            if progress is not None:
                progress(len(pixels), len(entries))
        for entry, image in zip(entries, pixels, strict=True):
            Image.fromarray(image).save(staging / entry["file"])
        rows = [
            np.concatenate(pixels[i : i + images_per_prompt], axis=1) for i in range(0, len(pixels), images_per_prompt)
        ]
        Image.fromarray(np.concatenate(rows, axis=0)).save(staging / GRID)
        manifest = {
            "tool": TOOL,
            "apex_version": __version__,
            "source": str(loaded.source.path),
            "source_format": loaded.source.export_format or "checkpoint",
            "weights_sha256": loaded.weights_sha256,
            "sampler": settings_record(settings),
            "image_size": list(pixels[0].shape[:2]),
            "images": entries,
            "grid": GRID,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        publish(staging, out, sync=False)  # images are reproducible from their seeds
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SampleResult(out, len(entries), out / GRID, out / MANIFEST, time.perf_counter() - started)


def _staging_folder(out: Path) -> Path:
    """A temporary sibling of ``out``, after checking that ``out`` is new, empty or an earlier sample folder."""
    if occupied(out):
        try:
            earlier = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("tool") == TOOL
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise DataError(
                f"--out {out} already holds files that apex sample did not write; refusing to replace them",
                hint="choose another --out (a new or empty folder, or one an earlier apex sample wrote)",
            )
    return staging_folder(out, "samples")
