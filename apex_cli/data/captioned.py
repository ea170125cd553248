"""Image-caption data of the diffusers teachers: folders, ``.jsonl`` / ``.parquet`` manifests, and prompts only.

Three sources (recipe ``data.name``), one list of :class:`Example` rows:

- ``folder``: every image under ``data.path`` (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, searched recursively,
  sorted by path) with its caption in the file of the same stem and ``data.caption_extension`` (``img.png`` +
  ``img.txt``).
- ``manifest``: one row a pair in a ``.jsonl`` file (one JSON object a line) or a ``.parquet`` file (read with
  pyarrow, ``pip install pyarrow``), columns ``data.image_column`` and ``data.caption_column``; image paths are
  relative to the manifest's folder unless absolute.
- ``prompts`` (image-free): a ``.txt`` file (one prompt a line, blank lines skipped) or the caption column of a
  manifest. Rows have no image; the loop replaces the data by the online model's one-step samples.

The order of the rows a run sees is :func:`batch_indices`: epoch ``e`` is a permutation of all rows seeded by
``(seed, e)``, and batch ``k`` takes positions ``[k B, (k + 1) B)`` of the epochs laid end to end, so a resumed run
continues with exactly the rows it would have seen, and every row is seen once an epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apex_cli.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Example:
    """One training row: its caption, and its image file (None for prompts-only data)."""

    caption: str
    image: Path | None


def list_examples(config: Any) -> list[Example]:
    """The rows of a ``folder``, ``manifest`` or ``prompts`` data section, in a fixed order.

    Raises:
        DataError: The path is missing, a caption file or column is missing, or there are no rows.
    """
    path = Path(config.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist", hint="point data.path at your folder or manifest file")
    if config.name == "folder":
        examples = _folder(path, config.caption_extension)
    elif config.name == "manifest":
        rows = _read_rows(path, [config.image_column, config.caption_column])
        examples = [
            Example(str(row[config.caption_column]), _resolve(path.parent, row[config.image_column])) for row in rows
        ]
    elif path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        examples = [Example(line.strip(), None) for line in lines if line.strip()]
    else:
        examples = [Example(str(row[config.caption_column]), None) for row in _read_rows(path, [config.caption_column])]
    if not examples:
        raise DataError(f"data.path: {path} holds no examples", hint="add image-caption pairs or prompts to it")
    return examples


def _folder(path: Path, caption_extension: str) -> list[Example]:
    if not path.is_dir():
        raise DataError(
            f"data.path: {path} is not a folder (data.name: folder)", hint="use data.name: manifest for files"
        )
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    examples = []
    for image in images:
        caption = image.with_suffix(caption_extension)
        if not caption.is_file():
            raise DataError(
                f"data.path: {image} has no caption file {caption.name}",
                hint=f"write its caption into {caption}, or remove the image",
            )
        examples.append(Example(caption.read_text(encoding="utf-8").strip(), image))
    return examples


def _read_rows(path: Path, columns: list[str]) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.parquet`` file as dicts holding at least ``columns``."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"data.path: reading {path.name} needs pyarrow", hint="pip install pyarrow, or use a .jsonl manifest"
            ) from None
        available = pq.read_schema(path).names
        missing = [c for c in columns if c not in available]
        if missing:
            raise DataError(f"data.path: {path} has no column {missing[0]!r} (it has {available})", hint=_COLUMN_HINT)
        return pq.read_table(path, columns=columns).to_pylist()  # type: ignore[no-any-return]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DataError(f"data.path: {path} line {number} is not JSON ({err})") from None
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        if missing:
            raise DataError(f"data.path: {path} line {number} has no {missing[0]!r} field", hint=_COLUMN_HINT)
        rows.append(row)
    return rows


_COLUMN_HINT = "name the columns with data.image_column / data.caption_column"


def _resolve(folder: Path, image: Any) -> Path:
    path = Path(str(image))
    return path if path.is_absolute() else folder / path


def load_image(path: Path, size: int) -> np.ndarray:
    """An RGB image as uint8 ``[size, size, 3]``: the shorter side resized to ``size`` (bicubic), centre-cropped.

    Raises:
        DataError: The file is missing or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def batch_indices(num_examples: int, batch_size: int, seed: int, batch: int) -> list[int]:
    """Rows of global batch ``batch`` (0-based): positions ``[batch B, (batch + 1) B)`` of seeded epoch permutations.

    Epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_examples)``.
    """
    start = batch * batch_size
    indices: list[int] = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        indices.extend(int(i) for i in order[offset : offset + batch_size - len(indices)])
    return indices


def epoch_of(num_examples: int, batch_size: int, batch: int) -> int:
    """The epoch the first row of global batch ``batch`` (0-based) belongs to."""
    return batch * batch_size // num_examples
