"""GenEval, the protocol: image folders, the official scoring rules, results.jsonl and the summary.

Follows djghosh13/geneval: ``generation/diffusers_generate.py`` (folder layout), ``evaluation/evaluate_images.py``
(scoring and the results rows) and ``evaluation/summary_scores.py`` (summary). The rules, for one image:

- Detections of each class are sorted by decreasing score; those with score ``> 0.3`` (``> 0.9`` for the counting
  task) are kept, at most 16 a class.
- Include clauses (all must hold): the ``count`` most confident detections of ``class`` must exist; if the clause
  has a ``color``, at least ``count`` of them must have it; if it has ``position: [relation, j]``, each of them must
  stand in ``relation`` to each object matched by clause ``j`` (see ``relative_position``).
- Exclude clauses (any fails the image): fail when ``count`` or more objects of ``class`` are detected.

Summary: per-task accuracy over images, and the overall score = the unweighted mean of the task accuracies.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from rich.table import Table

from apex_cli.errors import DataError
from apex_cli.eval.detectors import Detection, Detector

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
RESULT_FIELDS: tuple[str, ...] = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
"""The keys of a results.jsonl row, in evaluate_image's order."""

_SAMPLE_NAME = re.compile(r"\d+\.png")
_PROMPT_FOLDER = re.compile(r"\d+")


@dataclass(frozen=True)
class GenEvalOptions:
    """evaluate_images.py's ``--options`` with their official defaults."""

    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    position_threshold: float = POSITION_THRESHOLD


# ----------------------------------------------------------------------------------------------------------------
# Scoring rules


def select_detections(
    detections: dict[str, list[Detection]], threshold: float, max_objects: int = MAX_OBJECTS
) -> dict[str, list[Detection]]:
    """Per class: sort by decreasing score, keep ``score > threshold``, at most ``max_objects``; drop empty classes."""
    selected = {}
    for classname, dets in detections.items():
        kept = [d for d in sorted(dets, key=lambda d: -d.score) if d.score > threshold][:max_objects]
        if kept:
            selected[classname] = kept
    return selected


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A to box B (``relative_position`` of evaluate_images.py).

    With centres ``c``, sides ``w`` (per axis) and ``o = c_a - c_b``:

        o' = sign(o) * max(|o| - t (w_a + w_b), 0)       (t = position_threshold = 0.1)
        (dx, dy) = o' / |o|

    "left of" if ``dx < -0.5``, "right of" if ``dx > 0.5``, "above" if ``dy < -0.5``, "below" if ``dy > 0.5``
    (image y grows downwards); no relation at all when both components of ``o'`` are below 1e-3.
    """
    boxes = np.array([list(box_a)[:4], list(box_b)[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(
    detected: dict[str, list[Detection]],
    metadata: dict[str, Any],
    colors: Sequence[str],
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """Judge one image's selected detections against a metadata row (``evaluate`` of evaluate_images.py).

    Args:
        detected: Output of ``select_detections``: per class, sorted by decreasing score.
        metadata: The prompt's row (``include``, optional ``exclude``).
        colors: The detector's colour names, the order used to list found colours in a reason.
        position_threshold: The 0.1 margin of ``relative_position``.

    Returns:
        ``(correct, reason)``; ``reason`` holds one line per failed check, the official wording, empty if correct.
        Relations in a position reason are listed sorted (the official code prints a set, in arbitrary order).
    """
    correct = True
    reason: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found = detected.get(classname, [])[: req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:
                found_colors = [d.color for d in found]
                if found_colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{found_colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{found_colors.count(c)} {c}" for c in colors if c in found_colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                targets = matched_groups[target_group]
                if targets is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in targets:
                            true_rels = relative_position(obj.box, target.box, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    + f"{' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(detected.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(detected[classname])}")
    return correct, "\n".join(reason)


def evaluate_image(
    image: np.ndarray, metadata: dict[str, Any], detector: Detector, options: GenEvalOptions | None = None
) -> tuple[bool, str, dict[str, list[Detection]]]:
    """Detect, select with the task's threshold (0.9 for counting, else 0.3), and judge one image.

    Returns:
        ``(correct, reason, selected detections)``.
    """
    options = options or GenEvalOptions()
    threshold = options.counting_threshold if metadata["tag"] == "counting" else options.threshold
    detected = select_detections(detector.detect(image), threshold, options.max_objects)
    correct, reason = evaluate(detected, metadata, detector.colors, options.position_threshold)
    return correct, reason, detected


# ----------------------------------------------------------------------------------------------------------------
# Image folders


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``: ``SeedSequence([seed, index])``'s first 32-bit word, so it depends on the
    run seed and the prompt's position only (not on sharding or on what was generated before)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary file in the same folder, then ``os.replace`` it onto ``path``.

    The temporary name starts with a dot, so GenEval's ``\\d+\\.png`` never matches a half-written file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _expected_metadata(row: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**row, "seed": seed}


def _is_complete(folder: Path, metadata: dict[str, Any], images_per_prompt: int) -> bool:
    try:
        written = json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    samples = folder / "samples"
    names = {p.name for p in samples.iterdir() if _SAMPLE_NAME.fullmatch(p.name)} if samples.is_dir() else set()
    return written == metadata and names == {f"{k:04d}.png" for k in range(images_per_prompt)}


@dataclass
class GenerationReport:
    """What ``generate_images`` did: prompt indices generated now, and those found complete and skipped."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def generate_images(
    rows: Sequence[dict[str, Any]],
    outdir: str | os.PathLike[str],
    generate_fn: Callable[[list[str], list[int]], Sequence[np.ndarray]],
    images_per_prompt: int = 4,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 1,
) -> GenerationReport:
    """Generate GenEval image folders, resumably.

    Layout (diffusers_generate.py)::

        <outdir>/<index:05d>/metadata.jsonl      the prompt's row plus "seed" (one JSON object)
        <outdir>/<index:05d>/samples/<k:04d>.png

    Prompt ``index`` uses seed ``s = prompt_seed(seed, index)`` and its image ``k`` seed ``s + k``, so a resumed or
    sharded run writes the same images as a single uninterrupted one. A folder is complete when its metadata equals
    the expected row (with the seed) and exactly the expected PNGs exist; complete folders are skipped, others are
    cleared and regenerated. Every file is written atomically and metadata.jsonl last, so an interrupted run never
    leaves a folder that looks complete.

    Args:
        rows: Metadata rows (``read_suite`` / ``prompt_suite``); a row's index is its position here.
        outdir: Output folder.
        generate_fn: ``(prompts, seeds) -> images``: one ``(H, W, 3)`` uint8 array for each ``(prompts[i], seeds[i])``;
            an image must depend on its prompt and seed only, not on the rest of the batch.
        images_per_prompt: Images a prompt (GenEval uses 4).
        seed: Run seed.
        shard: ``(i, n)``: this process handles the prompts with ``index % n == i``.
        progress: Called with ``(prompts done, prompts in this shard)`` after each batch.
        batch_size: Images per ``generate_fn`` call: whole prompts are batched together (at least one a call).

    Returns:
        Which prompt indices were generated and which were skipped as complete.
    """
    shard_index, shard_count = shard
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    outdir = Path(outdir)
    indices = range(shard_index, len(rows), shard_count)
    report = GenerationReport()
    pending: list[tuple[int, Path, dict[str, Any], list[int]]] = []
    for index in indices:
        folder = outdir / f"{index:05d}"
        base_seed = prompt_seed(seed, index)
        metadata = _expected_metadata(rows[index], base_seed)
        if _is_complete(folder, metadata, images_per_prompt):
            report.skipped.append(index)
        else:
            pending.append((index, folder, metadata, [base_seed + k for k in range(images_per_prompt)]))
    if progress is not None and report.skipped:
        progress(len(report.skipped), len(indices))
    per_call = max(1, batch_size // images_per_prompt)
    for start in range(0, len(pending), per_call):
        group = pending[start : start + per_call]
        _generate_prompts(group, generate_fn)
        report.generated.extend(index for index, *_ in group)
        if progress is not None:
            progress(len(report.skipped) + len(report.generated), len(indices))
    return report


def one_prompt_at_a_time(
    fn: Callable[[str, list[int]], Sequence[np.ndarray]],
) -> Callable[[list[str], list[int]], list[np.ndarray]]:
    """Adapt a ``(prompt, seeds) -> images`` generator to the batched ``(prompts, seeds)`` form, a prompt a call."""

    def run(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for prompt, group in itertools.groupby(zip(prompts, seeds, strict=True), key=lambda pair: pair[0]):
            images.extend(fn(prompt, [s for _, s in group]))
        return images

    return run


def _generate_prompts(
    group: list[tuple[int, Path, dict[str, Any], list[int]]],
    generate_fn: Callable[[list[str], list[int]], Sequence[np.ndarray]],
) -> None:
    """Generate the images of several prompts in one call and write each prompt's folder, metadata last."""
    prompts = [metadata["prompt"] for _, _, metadata, seeds in group for _ in seeds]
    all_seeds = [s for *_, seeds in group for s in seeds]
    for _, folder, _, _ in group:
        (folder / "metadata.jsonl").unlink(missing_ok=True)
        samples = folder / "samples"
        if samples.is_dir():
            shutil.rmtree(samples)
        samples.mkdir(parents=True)
    images = list(generate_fn(prompts, all_seeds))
    if len(images) != len(all_seeds):
        raise ValueError(f"generate_fn returned {len(images)} images for {len(all_seeds)} seeds")
    position = 0
    for _, folder, metadata, seeds in group:
        for k in range(len(seeds)):
            image = np.asarray(images[position])
            position += 1
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"generate_fn must return (H, W, 3) uint8 arrays, got {image.dtype} {image.shape}")
            target = folder / "samples" / f"{k:04d}.png"
            _atomic_write(target, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
        _write_text(folder / "metadata.jsonl", json.dumps(metadata))


# ----------------------------------------------------------------------------------------------------------------
# Scoring a folder


def score_folder(
    outdir: str | os.PathLike[str],
    detector: Detector,
    *,
    options: GenEvalOptions | None = None,
    outfile: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every image of a GenEval folder and write ``results.jsonl`` (main() of evaluate_images.py).

    Rows carry exactly the official fields: ``filename`` (``<outdir>/<index>/samples/<k>.png``), ``tag``,
    ``prompt``, ``correct`` (bool), ``reason`` (str), ``metadata`` (the folder's metadata as a JSON string) and
    ``details`` (a JSON string ``{class: [[x1, y1, x2, y2, score], ...]}`` of the selected detections). Folders and
    images are visited in sorted order (the official script uses ``os.listdir`` order).

    Args:
        outdir: The folder ``generate_images`` wrote.
        detector: The detector.
        options: Thresholds.
        outfile: Where to write the rows; defaults to ``<outdir>/results.jsonl``. Written atomically.
        progress: Called with ``(images done, images in all)``.

    Returns:
        The rows.

    Raises:
        DataError: No prompt folders, or a prompt folder without metadata.jsonl (an unfinished generation).
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise DataError(f"image folder {outdir} not found")
    folders = sorted(p for p in outdir.iterdir() if p.is_dir() and _PROMPT_FOLDER.fullmatch(p.name))
    if not folders:
        raise DataError(f"{outdir} holds no prompt folders (00000/, 00001/, ...)")
    unfinished = [p.name for p in folders if not (p / "metadata.jsonl").is_file()]
    if unfinished:
        raise DataError(
            f"{len(unfinished)} prompt folders in {outdir} have no metadata.jsonl (first: {unfinished[0]})",
            hint="finish the generation first: re-running it resumes where it stopped",
        )
    jobs = []
    for folder in folders:
        metadata = json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8"))
        samples = folder / "samples"
        names = sorted(p.name for p in samples.iterdir() if _SAMPLE_NAME.fullmatch(p.name)) if samples.is_dir() else []
        jobs.extend((folder.name, name, metadata) for name in names)

    results = []
    for done, (folder_name, name, metadata) in enumerate(jobs, start=1):
        filename = os.path.join(str(outdir), folder_name, "samples", name)
        with Image.open(filename) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        correct, reason, detected = evaluate_image(image, metadata, detector, options or GenEvalOptions())
        results.append(
            {
                "filename": filename,
                "tag": metadata["tag"],
                "prompt": metadata["prompt"],
                "correct": correct,
                "reason": reason,
                "metadata": json.dumps(metadata),
                "details": json.dumps({key: [[*d.box, d.score] for d in value] for key, value in detected.items()}),
            }
        )
        if progress is not None:
            progress(done, len(jobs))
    target = Path(outfile) if outfile is not None else outdir / "results.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_text(target, "".join(json.dumps(row) + "\n" for row in results))
    return results


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a results.jsonl (ours or the official script's)."""
    path = Path(path)
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"results file {path} not found") from None


# ----------------------------------------------------------------------------------------------------------------
# Summary


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """summary_scores.py without pandas.

    Returns:
        ``total_images``; ``total_prompts`` (distinct ``metadata`` strings); ``correct_images`` (share of correct
        images); ``correct_prompts`` (share of prompts with at least one correct image); ``tasks``: per tag, in
        order of first appearance, ``{"accuracy", "correct", "total"}``; ``overall``: the unweighted mean of the
        task accuracies (the GenEval score).
    """
    if not results:
        raise DataError("no results to summarise")
    tasks: dict[str, dict[str, Any]] = {}
    prompts: dict[str, bool] = {}
    for row in results:
        task = tasks.setdefault(row["tag"], {"correct": 0, "total": 0})
        task["correct"] += int(bool(row["correct"]))
        task["total"] += 1
        prompts[row["metadata"]] = prompts.get(row["metadata"], False) or bool(row["correct"])
    for task in tasks.values():
        task["accuracy"] = task["correct"] / task["total"]
    return {
        "total_images": len(results),
        "total_prompts": len(prompts),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results),
        "correct_prompts": sum(prompts.values()) / len(prompts),
        "tasks": tasks,
        "overall": float(np.mean([t["accuracy"] for t in tasks.values()])),
    }


def summary_table(summary: dict[str, Any], title: str = "GenEval") -> Table:
    """The summary as a rich Table: one row per task, then the overall score."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    table.add_column("correct / images", justify="right")
    for tag, task in summary["tasks"].items():
        table.add_row(tag, f"{task['accuracy']:.2%}", f"{task['correct']} / {task['total']}")
    table.add_section()
    table.add_row("overall (mean of tasks)", f"{summary['overall']:.5f}", f"{summary['total_images']} images")
    return table
