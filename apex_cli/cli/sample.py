"""`apex sample`: images of prompts from a run, a checkpoint or an export, with a grid and a manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from apex_cli.cli._output import stderr, stdout, user_errors
from apex_cli.errors import DataError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    '  apex sample "a photo of a red circle" --ckpt runs/demo --nfe 1\n\n'
    '  apex sample "a photo of two squares" "a photo of a blue triangle" --n 8 --seed 7 --out samples\n\n'
    "  apex sample --prompts-file prompts.txt --ckpt runs/demo/final/export-diffusers --nfe 4\n\n"
    "Without --ckpt the model of the last `make demo` run (runs/demo) is used. Image k of prompt i has seed "
    "--seed + i n + k; manifest.json lists every file with its prompt, seed and NFE, the sampler settings and the "
    "SHA-256 of the weights."
)


@user_errors
def sample(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts, e.g. 'a photo of a red circle'.", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="Text file of prompts, one a line (blank lines skipped).")
    ] = None,
    ckpt: Annotated[
        str | None,
        typer.Option(
            "--ckpt",
            help="Run directory (its newest checkpoint), checkpoint directory, shipped:<name> or a folder written "
            "by `apex export`. Default: runs/demo.",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images a prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the first image; the others count up from it.")] = 0,
    nfe: Annotated[
        int | None, typer.Option(min=1, help="Network evaluations (default: the model's sampler; 1 for a student).")
    ] = None,
    style: Annotated[str | None, typer.Option(help="Sampler style few, any or mul (default: the model's).")] = None,
    stochastic_ratio: Annotated[
        float | None, typer.Option(min=0, max=1, help="Re-noising share s of the few style (default: the model's).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(min=0, help="g of F_c + g (F_c - F_u) (default: the model's; 0 for a student).")
    ] = None,
    height: Annotated[int | None, typer.Option(help="Image height (the shapes model: its training size only).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width (the shapes model: its training size only).")] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images a forward batch (it changes float rounding only, not the images' noise).")
    ] = 16,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <checkpoint or export>/samples).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Draw images of prompts with a model's own sampler (one step for an APEX student).

    Writes one PNG an image, grid.png (a row a prompt) and manifest.json into --out.
    """
    from apex_cli.cli.eval import _progress  # the bars every generating command shows
    from apex_cli.export.loading import default_output, load_model, resolve_source, settings_from_record
    from apex_cli.export.samples import NO_PROMPTS, check_prompts, check_size, read_prompt_file, write_samples

    texts = [*(prompts or []), *(read_prompt_file(prompts_file) if prompts_file else [])]
    if not texts:
        raise DataError(NO_PROMPTS)
    source = resolve_source(
        ckpt,
        on_skip=lambda path, why: stderr.print(f"skipped {path}: {why}", markup=False, highlight=False, soft_wrap=True),
    )
    with stderr.status(f"loading {source.path}"):
        loaded = load_model(source)
    check_prompts(loaded.model, texts)
    check_size(loaded.model, height, width)
    settings = settings_from_record(loaded.sampler, nfe, style, stochastic_ratio, guidance)
    progress = _progress()  # shown from the first finished batch on, so a refused --out prints no empty bar
    bar = progress.add_task(f"sampling, NFE {settings.nfe}", total=len(texts) * n)

    def update(done: int, _total: int) -> None:
        progress.start()
        progress.update(bar, completed=done)

    try:
        result = write_samples(
            loaded, texts, n, seed, settings, out or default_output(source.path, "samples"), batch_size, update
        )
    finally:
        progress.stop()
    summary = {"images": result.images, "out": str(result.out), "grid": str(result.grid)}
    if as_json:
        typer.echo(json.dumps({**summary, "manifest": str(result.manifest), "seconds": round(result.seconds, 3)}))
        return
    stdout.print(f"{result.images} images in {result.seconds:.1f} s ({result.images / result.seconds:.1f} images/s)")
    stdout.print(f"images:   {result.out}", markup=False, highlight=False, soft_wrap=True)
    stdout.print(f"grid:     {result.grid}", markup=False, highlight=False, soft_wrap=True)
    stdout.print(f"manifest: {result.manifest}", markup=False, highlight=False, soft_wrap=True)
