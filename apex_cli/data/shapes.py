"""The built-in shapes world: a renderer and a prompt grammar that follows GenEval's six task templates.

A scene holds 1 to 4 flat-coloured circles, squares and triangles on a black canvas (32x32 by default). Every scene
carries the GenEval metadata of its prompt, in the official ``evaluation_metadata.jsonl`` format of
djghosh13/geneval (``prompts/create_prompts.py``), so the same rows drive training, generation and scoring:

=============  ==========================================  ===============================================
tag            prompt                                      include / exclude
=============  ==========================================  ===============================================
single_object  a photo of a circle                         [{class, count: 1}]
two_object     a photo of a circle and a square            [{A, 1}, {B, 1}], A != B
counting       a photo of three triangles                  [{A, n}], exclude [{A, n + 1}], n in 2..4
colors         a photo of an orange square                 [{A, 1, color}]
position       a photo of a circle left of a square        [{B, 1}, {A, 1, position: [relation, 0]}]
color_attr     a photo of a red circle and a green square  [{A, 1, color_a}, {B, 1, color_b}], A != B, colours differ
=============  ==========================================  ===============================================

As in the official file, the ``position`` clause sits on the *second* include (the subject A of the sentence) and
reads "A is <relation> of include[0]".

Geometry: objects are ``size`` x ``size`` pixel boxes (8 to 12 px at 32x32, scaled with the canvas), placed with a
one-pixel border and at least 2 px (scaled) of background between any two boxes, so no two objects touch. A shape's
mask fills its box exactly (first and last rows and columns are set), which lets the detector recover the box.
Position layouts satisfy GenEval's relation rule with a clear margin (see ``_relation_offsets``).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from apex_cli.errors import DataError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 200, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "purple": (160, 0, 255),
    "white": (255, 255, 255),
}
"""The eight object colours. Closest pair (orange / yellow) is 127 apart in RGB; black is >= 200 from all."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
"""GenEval's number words (``numbers`` in create_prompts.py); counting prompts use 2 to 4."""

DEFAULT_COUNTS: dict[str, int] = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
"""Prompts per task of the official 553-prompt suite."""

QUICK_COUNTS: dict[str, int] = dict.fromkeys(TASKS, 10)
"""A 60-prompt quick suite (10 per task) for smoke runs; 240 images at 4 a prompt."""

OBJECT_SIZE_RANGE_32: tuple[int, int] = (8, 12)
"""Object box side range, in pixels, on a 32x32 canvas; it scales linearly with the canvas."""

MIN_CANVAS = 32


@dataclass(frozen=True)
class ShapeObject:
    """One flat-coloured shape.

    Attributes:
        shape: One of ``SHAPES``.
        color: A key of ``PALETTE``.
        cx: Box centre x in continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``).
        cy: Box centre y, same convention (y grows downwards).
        size: Side of the square box in pixels; the box is ``[cx - size/2, cx + size/2) x [cy - size/2, ...)``.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The box ``(x1, y1, x2, y2)`` with exclusive ``x2, y2``, as detectors report it."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    """A scene and its prompt.

    Attributes:
        objects: The shapes, listed clause by clause in the order of ``metadata["include"]``.
        prompt: The text prompt (equal to ``metadata["prompt"]``).
        metadata: The GenEval metadata row (``tag``, ``include``, ``exclude`` for counting, ``prompt``).
    """

    objects: tuple[ShapeObject, ...]
    prompt: str
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean mask of ``shape`` inscribed in a ``height`` x ``width`` box; its bounding box is the whole box.

    With pixel centres ``u = (c + 0.5) / width`` and ``v = (r + 0.5) / height`` in ``(0, 1)``:

    - square: every pixel;
    - circle (an ellipse when ``width != height``): ``(2u - 1)^2 + (2v - 1)^2 <= 1``;
    - triangle (apex up, base on the last row): ``|u - 1/2| <= (r + 1) / (2 height)``, i.e. the half width grows
      linearly from the first row to the full base, so the apex row is set and the fill ratio is about 1/2.

    The detector renders these same templates into a blob's bounding box to score its shape.
    """
    if width < 1 or height < 1:
        raise ValueError(f"mask size must be positive, got {width}x{height}")
    rows, cols = np.mgrid[0:height, 0:width]
    u = (cols + 0.5) / width
    v = (rows + 0.5) / height
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return (2 * u - 1) ** 2 + (2 * v - 1) ** 2 <= 1.0 + 1e-9
    if shape == "triangle":
        return np.abs(u - 0.5) <= (rows + 1) / (2 * height) + 1e-9
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Draw ``scene`` on a black ``size`` x ``size`` canvas.

    Args:
        scene: The scene; object coordinates are pixels of this canvas.
        size: Canvas side in pixels.

    Returns:
        The image, shape ``(size, size, 3)``, dtype uint8.

    Raises:
        ValueError: An object does not fit the canvas.
    """
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in scene.objects:
        x0 = round(obj.cx - obj.size / 2)
        y0 = round(obj.cy - obj.size / 2)
        if x0 < 0 or y0 < 0 or x0 + obj.size > size or y0 + obj.size > size:
            raise ValueError(f"{obj} does not fit a {size}x{size} canvas")
        mask = shape_mask(obj.shape, obj.size, obj.size)
        image[y0 : y0 + obj.size, x0 : x0 + obj.size][mask] = PALETTE[obj.color]
    return image


# ----------------------------------------------------------------------------------------------------------------
# Prompt grammar (create_prompts.py wording)


def with_article(word: str) -> str:
    """``"a circle"`` / ``"an orange"``: GenEval's ``with_article`` (``an`` before a vowel letter)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def make_plural(word: str) -> str:
    """GenEval's ``make_plural``: add ``es`` after a final ``s``, else ``s``."""
    return f"{word}es" if word.endswith("s") else f"{word}s"


def prompt_from_metadata(metadata: dict[str, Any]) -> str:
    """The prompt of a metadata row, worded as GenEval's create_prompts.py words it, for any class names.

    Reproduces every prompt of the official evaluation_metadata.jsonl from its ``tag`` and ``include`` clauses.
    """
    tag, inc = metadata["tag"], metadata["include"]
    if tag == "single_object":
        return f"a photo of {with_article(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {with_article(inc[0]['class'])} and {with_article(inc[1]['class'])}"
    if tag == "counting":
        return f"a photo of {NUMBERS[inc[0]['count']]} {make_plural(inc[0]['class'])}"
    if tag == "colors":
        return f"a photo of {with_article(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":
        subject, reference = inc[1], inc[0]
        return (
            f"a photo of {with_article(subject['class'])} {subject['position'][0]} {with_article(reference['class'])}"
        )
    if tag == "color_attr":
        a, b = inc
        return f"a photo of {with_article(a['color'])} {a['class']} and {with_article(b['color'])} {b['class']}"
    raise ValueError(f"unknown task {tag!r}; expected one of {TASKS}")


def _row(tag: str, include: list[dict[str, Any]], exclude: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A metadata row with the official key order: tag, include, [exclude], prompt."""
    row: dict[str, Any] = {"tag": tag, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    row["prompt"] = prompt_from_metadata(row)
    return row


@cache
def _distinct_rows(tag: str) -> tuple[str, ...]:
    """Every distinct metadata row of a task, JSON-encoded, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        rows = [_row(tag, [{"class": a, "count": 1}]) for a in SHAPES]
    elif tag == "two_object":
        rows = [_row(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}]) for a, b in pairs]
    elif tag == "counting":
        rows = [
            _row(tag, [{"class": a, "count": n}], exclude=[{"class": a, "count": n + 1}])
            for a in SHAPES
            for n in (2, 3, 4)
        ]
    elif tag == "colors":
        rows = [_row(tag, [{"class": a, "count": 1, "color": c}]) for a in SHAPES for c in PALETTE]
    elif tag == "position":
        # As in create_prompts.py: include[0] is the reference B, include[1] the subject A with [relation, 0].
        rows = [
            _row(tag, [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}])
            for a, b in pairs
            for rel in RELATIONS
        ]
    elif tag == "color_attr":
        rows = [
            _row(tag, [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
            for a, b in pairs
            for ca, cb in itertools.permutations(PALETTE, 2)
        ]
    else:
        raise ValueError(f"unknown task {tag!r}; expected one of {TASKS}")
    return tuple(json.dumps(r) for r in rows)


def task_rows(tag: str) -> list[dict[str, Any]]:
    """All distinct metadata rows the grammar allows for ``tag`` (3, 6, 9, 24, 24 and 336 for the six tasks)."""
    return [json.loads(r) for r in _distinct_rows(tag)]


@cache
def _rows_by_prompt() -> dict[str, str]:
    return {json.loads(r)["prompt"]: r for tag in TASKS for r in _distinct_rows(tag)}


def row_for_prompt(prompt: str) -> dict[str, Any]:
    """The metadata row of a shapes prompt (each prompt of the grammar has exactly one).

    Raises:
        DataError: The prompt is not in the shapes grammar.
    """
    try:
        return json.loads(_rows_by_prompt()[prompt])
    except KeyError:
        raise DataError(
            f"{prompt!r} is not a shapes prompt", hint="shapes prompts follow GenEval's templates"
        ) from None


def render_prompt(prompt: str, seed: int, size: int = 32) -> np.ndarray:
    """A rendered image that matches a shapes prompt, deterministic in ``seed`` (the renderer as a generator)."""
    return render(scene_from_metadata(np.random.default_rng(seed), row_for_prompt(prompt), size), size)


def vocabulary() -> list[str]:
    """Every word any shapes prompt can contain, sorted (for a word-level tokenizer)."""
    words = {"a", "an", "photo", "of", "and"}
    words.update(SHAPES)
    words.update(make_plural(s) for s in SHAPES)
    words.update(PALETTE)
    words.update(NUMBERS[2:5])
    words.update(w for rel in RELATIONS for w in rel.split())
    return sorted(words)


def prompt_suite(seed: int = 0, counts: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The shapes GenEval suite: metadata rows, tasks in ``TASKS`` order.

    Each task draws its rows from a seeded permutation of its distinct rows, so prompts are unique as long as the
    grammar has enough of them. single_object (3 distinct), two_object (6), counting (9), colors (24) and
    position (24) have fewer than the official counts: their rows are then repeated, by concatenating fresh
    permutations, so every distinct prompt appears ``n // k`` or ``n // k + 1`` times.

    Args:
        seed: Seed of the permutations.
        counts: Prompts per task; tasks left out get none. Defaults to ``DEFAULT_COUNTS`` (80/99/80/94/100/100).

    Returns:
        The rows, each ``{"tag", "include", ["exclude"], "prompt"}``.
    """
    counts = DEFAULT_COUNTS if counts is None else counts
    unknown = set(counts) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {TASKS}")
    rng = np.random.default_rng(seed)
    suite: list[dict[str, Any]] = []
    for tag in TASKS:
        n = counts.get(tag, 0)
        if n < 0:
            raise ValueError(f"count for {tag} must be >= 0, got {n}")
        distinct = _distinct_rows(tag)
        picked: list[str] = []
        while len(picked) < n:
            picked.extend(distinct[i] for i in rng.permutation(len(distinct)))
        suite.extend(json.loads(r) for r in picked[:n])
    return suite


# ----------------------------------------------------------------------------------------------------------------
# Scene sampling


def object_size_range(size: int) -> tuple[int, int]:
    """Inclusive range of object box sides on a ``size`` canvas: 8..12 at 32, 16..24 at 64."""
    lo, hi = OBJECT_SIZE_RANGE_32
    return round(lo * size / 32), round(hi * size / 32)


def _relation_offsets(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> tuple[float, float]:
    """GenEval's normalised offset of box A from box B (``relative_position`` in evaluate_images.py).

    With centre offset ``o = c_a - c_b`` and box sides ``w``:
    ``o' = sign(o) max(|o| - 0.1 (w_a + w_b), 0)`` per axis, and ``(dx, dy) = o' / |o|``. GenEval calls A
    "left of" B when ``dx < -0.5``, "right of" when ``dx > 0.5``, "above" when ``dy < -0.5``, "below" when
    ``dy > 0.5``. (apex_cli.eval.geneval implements the rule itself; the tests check both agree.)
    """
    a = np.asarray(box_a, dtype=float).reshape(2, 2)
    b = np.asarray(box_b, dtype=float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(np.diff(a, axis=0))[0] + np.abs(np.diff(b, axis=0))[0]
    revised = np.maximum(np.abs(offset) - 0.1 * dims, 0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if norm == 0:
        return 0.0, 0.0
    return float(revised[0] / norm), float(revised[1] / norm)


RELATION_MARGIN = 0.7
"""Renderer layouts put the relation's own axis at ``|d| >= 0.7`` (GenEval needs 0.5) ..."""
CROSS_AXIS_LIMIT = 0.35
"""... and the other axis at ``|d| <= 0.35``, so the picture shows one relation only."""


def _holds_clearly(relation: str, box_a: tuple[float, ...], box_b: tuple[float, ...]) -> bool:
    dx, dy = _relation_offsets(box_a, box_b)
    main, cross, sign = {"left of": (dx, dy, -1), "right of": (dx, dy, 1), "above": (dy, dx, -1), "below": (dy, dx, 1)}[
        relation
    ]
    return sign * main >= RELATION_MARGIN and abs(cross) <= CROSS_AXIS_LIMIT


def _check_shapes_row(metadata: dict[str, Any]) -> None:
    for clause in metadata.get("include", []):
        if clause["class"] not in SHAPES:
            raise DataError(f"class {clause['class']!r} is not a shape; the shapes world has {', '.join(SHAPES)}")
        if "color" in clause and clause["color"] not in PALETTE:
            raise DataError(f"colour {clause['color']!r} is not in the shapes palette ({', '.join(PALETTE)})")


def scene_from_metadata(rng: np.random.Generator, metadata: dict[str, Any], size: int = 32) -> Scene:
    """Lay out a scene that satisfies a GenEval metadata row of the shapes grammar.

    Each include clause contributes ``count`` objects of its class, coloured as the clause says or with a random
    palette colour; a clause with ``position: [relation, j]`` puts each of its objects ``relation`` of every object
    of clause ``j`` with a clear margin. No other objects are drawn, so exclude clauses hold too.

    Args:
        rng: Source of randomness; the scene is a deterministic function of its state.
        metadata: A row with shapes classes and palette colours (for example from ``prompt_suite``).
        size: Canvas side in pixels, at least 32.

    Returns:
        The scene.

    Raises:
        DataError: The row names a class or colour outside the shapes world, or asks for more than 4 objects.
    """
    if size < MIN_CANVAS:
        raise ValueError(f"canvas must be at least {MIN_CANVAS} px, got {size}")
    _check_shapes_row(metadata)
    clauses = metadata["include"]
    if sum(c["count"] for c in clauses) > 4:
        raise DataError(f"a shapes scene holds at most 4 objects; {metadata['prompt']!r} asks for more")
    for i, clause in enumerate(clauses):
        if "position" in clause and not 0 <= clause["position"][1] < i:
            raise DataError(f"position target {clause['position'][1]} of clause {i} must be an earlier clause")
    lo, hi = object_size_range(size)
    gap = max(2, round(2 * size / 32))
    border = max(1, round(size / 32))
    for _ in range(1000):
        objects: list[ShapeObject] = []
        groups: list[list[ShapeObject]] = []
        for clause in clauses:
            group: list[ShapeObject] = []
            for _ in range(clause["count"]):
                obj = _place(rng, clause, objects, groups, size, lo, hi, gap, border)
                if obj is None:
                    break
                objects.append(obj)
                group.append(obj)
            groups.append(group)
            if len(group) < clause["count"]:
                break
        else:
            return Scene(objects=tuple(objects), prompt=metadata["prompt"], metadata=metadata)
    raise RuntimeError(f"could not lay out {metadata['prompt']!r} on a {size}x{size} canvas")


def _place(
    rng: np.random.Generator,
    clause: dict[str, Any],
    placed: list[ShapeObject],
    groups: list[list[ShapeObject]],
    size: int,
    lo: int,
    hi: int,
    gap: int,
    border: int,
) -> ShapeObject | None:
    """One object for ``clause`` that keeps ``gap`` px from ``placed`` and honours the clause's relation."""
    color = clause.get("color") or list(PALETTE)[int(rng.integers(len(PALETTE)))]
    for _ in range(100):
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(border, size - border - side + 1))
        y0 = int(rng.integers(border, size - border - side + 1))
        obj = ShapeObject(clause["class"], color, x0 + side / 2, y0 + side / 2, side)
        x1, y1, x2, y2 = obj.box
        if any(
            x1 < o.box[2] + gap and o.box[0] < x2 + gap and y1 < o.box[3] + gap and o.box[1] < y2 + gap for o in placed
        ):
            continue
        if "position" in clause:
            relation, target = clause["position"]
            if not all(_holds_clearly(relation, obj.box, t.box) for t in groups[target]):
                continue
        return obj
    return None


def sample_scene(rng: np.random.Generator, tag: str | None = None, size: int = 32) -> Scene:
    """A random prompt of task ``tag`` (a random task when ``None``) and a scene that matches it.

    Args:
        rng: Source of randomness.
        tag: One of ``TASKS`` or ``None``.
        size: Canvas side in pixels.

    Returns:
        The scene; ``render(scene, size)`` draws it.
    """
    if tag is None:
        tag = TASKS[int(rng.integers(len(TASKS)))]
    rows = _distinct_rows(tag)
    metadata = json.loads(rows[int(rng.integers(len(rows)))])
    return scene_from_metadata(rng, metadata, size)


def training_stream(seed: int, size: int = 32) -> Iterator[tuple[str, np.ndarray]]:
    """Endless ``(prompt, image)`` pairs, each task with probability 1/6, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        scene = sample_scene(rng, None, size)
        yield scene.prompt, render(scene, size)


def training_batches(
    seed: int, batch_size: int, size: int = 32, skip: int = 0
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Endless batches ``(prompts, uint8 images [B, S, S, 3])`` of the training stream.

    Batch ``k`` (counting from 1) is rendered from its own seed ``seed * 1_000_003 + k``, so a resumed run starts
    at batch ``skip + 1`` at once and sees exactly the batches it would have seen.
    """
    step = skip
    while True:
        step += 1
        stream = training_stream(seed * 1_000_003 + step, size=size)
        pairs = [next(stream) for _ in range(batch_size)]
        yield [prompt for prompt, _ in pairs], np.stack([image for _, image in pairs])


# ----------------------------------------------------------------------------------------------------------------
# Suite files (official JSONL: one object a line)


def write_suite(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write metadata rows as ``evaluation_metadata.jsonl`` does (``json.dumps`` a line), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _validate_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, kind in (("tag", str), ("prompt", str), ("include", list)):
        if not isinstance(row.get(key), kind):
            raise DataError(f"{where}: field {key!r} must be a {kind.__name__}")
    if not row["include"]:
        raise DataError(f"{where}: 'include' is empty")
    clauses = [("include", c) for c in row["include"]] + [("exclude", c) for c in row.get("exclude", [])]
    for part, clause in clauses:
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
            raise DataError(f"{where}: every {part} clause needs a 'class' string")
        count = clause.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise DataError(f"{where}: {part} clause {clause} needs an integer 'count' >= 1")
        if "color" in clause and not isinstance(clause["color"], str):
            raise DataError(f"{where}: 'color' must be a string")
        if "position" in clause:
            pos = clause["position"]
            if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)):
                raise DataError(f"{where}: 'position' must be [relation, index] with a relation in {RELATIONS}")


def read_suite(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read GenEval metadata rows (the official ``evaluation_metadata.jsonl`` or ``write_suite`` output).

    Raises:
        DataError: The file is missing, or a line is not a valid metadata row (the message names the line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"prompt file {path} not found") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        _validate_row(row, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise DataError(f"prompt file {path} holds no prompts")
    return rows
