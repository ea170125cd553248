"""`apex eval geneval | fid`: score images with the GenEval protocol, or measure FID and KID (clean-fid)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from apex_cli.cli._output import stderr, stdout, user_errors
from apex_cli.errors import ApexError, DataError

app = typer.Typer(help="Measure images: GenEval (object, count, colour, position) and FID / KID.", no_args_is_help=True)

GENEVAL_EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  apex eval geneval --images outputs/geneval\n\n"
    "  apex eval geneval --images outputs/geneval --detector mmdet --detector-weights ~/geneval-weights --json\n\n"
    "The folder layout is GenEval's: <dir>/<index:05d>/metadata.jsonl and <dir>/<index:05d>/samples/<k:04d>.png."
)
FID_EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  apex eval fid --images outputs/samples --ref shapes\n\n"
    "  apex eval fid --images outputs/samples --ref data/real-images --feature-weights ~/inception-2015-12-05.pt"
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
    )


def _tracker(progress: Progress, description: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that drives one bar of ``progress``."""
    task = progress.add_task(description, total=None)
    return lambda done, total: progress.update(task, completed=done, total=total)


@app.command("geneval", epilog=GENEVAL_EXAMPLES, no_args_is_help=True)
@user_errors
def geneval(
    images: Annotated[Path | None, typer.Option("--images", help="GenEval image folder made by any tool.")] = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Generate with this checkpoint, then score.")] = None,
    nfe: Annotated[
        str | None, typer.Option(help="With --ckpt: NFEs to compare, e.g. 1,2,4 (default: the recipe's).")
    ] = None,
    prompts: Annotated[
        str, typer.Option(help="With --ckpt: 'shapes', 'shapes-quick' or a GenEval metadata JSONL file.")
    ] = "shapes",
    n: Annotated[int, typer.Option("--n", min=1, help="With --ckpt: images a prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="With --ckpt: base seed (per-prompt seeds are recorded).")] = 0,
    shard: Annotated[str, typer.Option(help="With --ckpt: generate only shard i of n, as i/n (0-based).")] = "0/1",
    out: Annotated[Path | None, typer.Option(help="With --ckpt: output folder (default: <run>/geneval).")] = None,
    guidance: Annotated[
        float | None,
        typer.Option(help="With --ckpt: classifier-free guidance g of F_c + g (F_c - F_u) (default: the recipe's)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="With --ckpt: images generated per forward batch.")] = 256,
    detector: Annotated[
        Literal["shapes", "mmdet"],
        typer.Option(help="shapes: exact, offline, for the built-in shapes world; mmdet: the official GenEval one."),
    ] = "shapes",
    detector_weights: Annotated[
        Path | None, typer.Option(help="Folder with the official Mask2Former and CLIP weights (for --detector mmdet).")
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="Where to write results.jsonl (default: inside --images).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
) -> None:
    """Score images with GenEval's official rules: a folder made by any tool (--images), or generated (--ckpt).

    Writes results.jsonl (one row per image, the official fields, readable by GenEval's summary_scores.py) and
    prints the per-task and overall scores. Generation is resumable (finished prompt folders are skipped) and
    shardable (--shard i/n).
    """
    from apex_cli.eval.detectors import MMDetDetector, ShapesDetector
    from apex_cli.eval.geneval import score_folder, summarize, summary_table

    if (images is None) == (ckpt is None):
        raise ApexError("give exactly one of --images DIR or --ckpt PATH")
    chosen = ShapesDetector() if detector == "shapes" else MMDetDetector(detector_weights)
    if images is not None:
        folders = {"images": images}
    else:
        folders = _generate_for_geneval(ckpt, nfe, prompts, n, seed, shard, out, guidance, batch_size)  # type: ignore[arg-type]
    summaries = {}
    for name, folder in folders.items():
        outfile = results if results and len(folders) == 1 else folder / "results.jsonl"
        with _progress() as progress:
            rows = score_folder(folder, chosen, outfile=outfile, progress=_tracker(progress, f"scoring {name}"))
        summaries[name] = {**summarize(rows), "results": str(outfile)}
    if as_json:
        typer.echo(json.dumps({"detector": detector, "scores": summaries}, indent=2))
    elif len(summaries) == 1:
        name, summary = next(iter(summaries.items()))
        stdout.print(summary_table(summary, title=f"GenEval ({detector} detector): {folders[name]}"))
        stdout.print(f"results: {summary['results']}")
    else:
        stdout.print(_nfe_table(summaries, f"GenEval ({detector} detector): {ckpt}"))


@app.command("fid", epilog=FID_EXAMPLES, no_args_is_help=True)
@user_errors
def fid(
    ref: Annotated[str, typer.Option(help="Reference: 'shapes' (the built-in renderer) or a folder of PNG images.")],
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder of PNG images to score (searched recursively).")
    ] = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Generate with this checkpoint, then score.")] = None,
    nfe: Annotated[int | None, typer.Option(min=1, help="With --ckpt: sampling steps (default: the recipe's).")] = None,
    n_images: Annotated[int, typer.Option(min=2, help="With --ckpt: images to generate.")] = 2000,
    out: Annotated[
        Path | None, typer.Option(help="With --ckpt: output folder (default: <checkpoint>/fid-nfe<N>).")
    ] = None,
    features: Annotated[
        Literal["auto", "shapes", "inception"],
        typer.Option(help="Feature network; auto = shapes for --ref shapes, else clean-fid's Inception."),
    ] = "auto",
    feature_weights: Annotated[
        Path | None, typer.Option(help="Local weights file of the feature network (offline clusters).")
    ] = None,
    ref_images: Annotated[int, typer.Option(min=2, help="Images rendered for --ref shapes.")] = 5000,
    image_size: Annotated[int, typer.Option(help="Image size of --ref shapes (32 or 64).")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """FID and KID (clean-fid, mode clean, PNG only) of a folder against a reference.

    Reference statistics are cached in the user cache directory ($APEX_CACHE_DIR, else ~/.cache/apex).
    """
    from apex_cli.eval.fid import compute_fid, shapes_reference

    if (images is None) == (ckpt is None):
        raise ApexError("give exactly one of --images DIR or --ckpt PATH")
    if ckpt is not None:
        images = _generate_for_fid(ckpt, nfe, n_images, out)
    if ref == "shapes":
        reference: Path | object = shapes_reference(seed=0, n_images=ref_images, image_size_px=image_size)
    elif Path(ref).is_dir():
        reference = Path(ref)
    else:
        raise ApexError(f"--ref {ref!r} is neither 'shapes' nor an existing folder of PNG images")
    chosen = features if features != "auto" else ("shapes" if ref == "shapes" else "inception")
    with stderr.status("extracting features ..."):
        result = compute_fid(images, reference, features=chosen, feature_weights=feature_weights)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
        return
    table = Table(title=f"FID / KID: {images}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("FID", f"{result.fid:.4f}")
    table.add_row("KID", f"{result.kid:.6f}")
    table.add_row("images", str(result.n_images))
    table.add_row("reference", f"{result.ref_name} ({result.n_ref_images} images) #{result.ref_hash}")
    table.add_row("mode", result.mode)
    table.add_row("features", f"{result.features} #{result.feature_hash}")
    stdout.print(table)


def _parse_shard(shard: str) -> tuple[int, int]:
    index, sep, count = shard.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise ApexError(f"--shard {shard!r} is not of the form i/n with 0 <= i < n, e.g. 0/4")
    return int(index), int(count)


def _parse_nfe(nfe: str) -> list[int]:
    try:
        values = [int(v) for v in nfe.split(",")]
    except ValueError:
        raise ApexError(f"--nfe {nfe!r} must be a comma-separated list of integers, e.g. 1,2,4") from None
    if any(v < 1 for v in values):
        raise ApexError(f"--nfe {nfe!r}: every NFE must be >= 1")
    return values


def _load_prompts(prompts: str) -> list[dict]:
    from apex_cli.data import shapes

    if prompts == "shapes":
        return shapes.prompt_suite(seed=0)
    if prompts == "shapes-quick":
        return shapes.prompt_suite(seed=0, counts=shapes.QUICK_COUNTS)
    if not Path(prompts).is_file():
        raise ApexError(f"--prompts {prompts!r} is neither 'shapes', 'shapes-quick' nor an existing JSONL file")
    rows = shapes.read_suite(prompts)
    empty = [i for i, row in enumerate(rows, start=1) if not row["prompt"].strip()]
    if empty:
        raise DataError(
            f"--prompts {prompts}: prompt {empty[0]} of {len(rows)} is empty ({len(empty)} empty in all)",
            hint="every row needs the text to generate from in its 'prompt' field",
        )
    return rows


def _generate_for_geneval(
    ckpt: Path | None,
    nfe: str | None,
    prompts: str,
    n: int,
    seed: int,
    shard: str,
    out: Path | None,
    guidance: float | None = None,
    batch_size: int = 256,
) -> dict[str, Path]:
    """Generate the GenEval folders of a checkpoint, one per NFE; returns NFE label -> folder."""
    from apex_cli.eval.generate import generate_fn
    from apex_cli.eval.geneval import generate_images
    from apex_cli.train.checkpoint import resolve_checkpoint
    from apex_cli.train.sampling import checkpoint_sampler
    from apex_cli.train.tasks import load_checkpoint_model

    rows, shard_spec = _load_prompts(prompts), _parse_shard(shard)  # before the model loads: fail fast
    steps_list = _parse_nfe(nfe) if nfe else None
    model, recipe, meta = load_checkpoint_model(ckpt)  # type: ignore[arg-type]
    if not hasattr(model, "encode_prompts"):
        raise ApexError(
            f"{ckpt} is a {recipe.model.name} checkpoint, not a text-to-image model; its run's "
            "metrics.json holds its evaluation"
        )
    base = out or resolve_checkpoint(ckpt) / "geneval"  # type: ignore[arg-type]
    folders = {}
    for steps in steps_list or [recipe.sampler.nfe]:
        settings = checkpoint_sampler(recipe, meta, steps)
        suffix = ""
        if guidance is not None:
            settings, suffix = dataclasses.replace(settings, guidance=guidance), f"-g{guidance:g}"
        folder = base / f"{prompts if prompts.startswith('shapes') else Path(prompts).stem}-nfe{steps}{suffix}"
        with _progress() as progress:
            update = _tracker(progress, f"generating NFE {steps}")
            generate_images(
                rows, folder, generate_fn(model, settings), n, seed, shard_spec, progress=update, batch_size=batch_size
            )
        folders[f"NFE {steps}"] = folder
    return folders


def _generate_for_fid(ckpt: Path, nfe: int | None, n_images: int, out: Path | None) -> Path:
    """Generate ``n_images`` PNGs for prompts drawn from the shapes grammar (seed 1; the reference uses seed 0).

    Resumable: existing ``<k:06d>.png`` files are kept.
    """
    from PIL import Image

    from apex_cli.data import shapes
    from apex_cli.eval.generate import generate
    from apex_cli.train.checkpoint import resolve_checkpoint
    from apex_cli.train.sampling import checkpoint_sampler
    from apex_cli.train.tasks import load_checkpoint_model

    model, recipe, meta = load_checkpoint_model(ckpt)
    if recipe.data.name != "shapes":
        raise ApexError(f"{ckpt} is a {recipe.model.name} checkpoint; `apex eval fid --ckpt` needs a shapes model")
    steps = nfe or recipe.sampler.nfe
    folder = out or resolve_checkpoint(ckpt) / f"fid-nfe{steps}"
    folder.mkdir(parents=True, exist_ok=True)
    stream = shapes.training_stream(1, size=model.image_size)  # type: ignore[arg-type]
    prompts = [next(stream)[0] for _ in range(n_images)]
    settings = checkpoint_sampler(recipe, meta, steps)
    with _progress() as progress:
        task = progress.add_task(f"generating NFE {steps}", total=n_images)
        for start in range(0, n_images, 50):
            indices = [k for k in range(start, min(start + 50, n_images)) if not (folder / f"{k:06d}.png").is_file()]
            if indices:
                batch = generate(model, [prompts[k] for k in indices], indices, settings)
                for k, image in zip(indices, batch, strict=True):
                    tmp = folder / f".{k:06d}.png.tmp"
                    Image.fromarray(image).save(tmp, format="PNG")
                    tmp.replace(folder / f"{k:06d}.png")
            progress.update(task, completed=min(start + 50, n_images))
    return folder


def _nfe_table(summaries: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("task")
    for name in summaries:
        table.add_column(name, justify="right")
    tasks = list(next(iter(summaries.values()))["tasks"])
    for tag in tasks:
        table.add_row(tag, *(f"{s['tasks'][tag]['accuracy']:.3f}" for s in summaries.values()))
    table.add_section()
    table.add_row("overall (mean of tasks)", *(f"{s['overall']:.4f}" for s in summaries.values()))
    return table
