"""`apex export`: a checkpoint as a diffusers pipeline folder, LoRA adapters or merged weights, round-tripped."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from apex_cli.cli._output import stderr, stdout, user_errors

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  apex export --ckpt runs/demo --format diffusers --out exports/shapes-1step\n\n"
    "  apex export --ckpt runs/shapes-apex-lora-cpu --format lora\n\n"
    "  apex export --ckpt runs/shapes-apex-lora-cpu/checkpoints/step_0001000 --format merged --overwrite\n\n"
    "  apex export --ckpt runs/qwen-image-apex-lora --format lora   (diffusers teachers: lora or merged)\n\n"
    "Load a diffusers export with diffusers alone:\n\n"
    '  DiffusionPipeline.from_pretrained("exports/shapes-1step", trust_remote_code=True)("a photo of a red circle")\n\n'
    "Every export carries its sampler settings (apex_sampler.json: NFE, time grid, style, stochastic ratio, guidance)"
    " and apex_export.json (source, round-trip result, SHA-256 of every file)."
)
FORMAT_HELP = (
    "diffusers: a complete pipeline folder for DiffusionPipeline.from_pretrained; lora: the adapters of a LoRA "
    "checkpoint for load_lora_weights; merged: the full model with the adapters fused. (ComfyUI's LoRA layout is not "
    "offered: ComfyUI cannot load the shapes model it would apply to.) Students of diffusers teachers (Qwen-Image, "
    "SANA, SD3, FLUX, Z-Image): lora (for the stock pipeline's load_lora_weights) or merged (transformer/ with the "
    "adapters fused)."
)


@user_errors
def export(
    ckpt: Annotated[
        str,
        typer.Option(
            "--ckpt",
            help="Run directory (its newest checkpoint), checkpoint directory or shipped:<name>.",
            show_default=False,
        ),
    ],
    export_format: Annotated[str, typer.Option("--format", help=FORMAT_HELP, show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <checkpoint>/export-<format>).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a checkpoint in a format other tools load, with its sampler settings beside the weights.

    After writing, the export is loaded back the way its users load it (diffusers' own from_pretrained and
    load_lora_weights) and one fixed-seed sample of two prompts is compared with the checkpoint's own; a mismatch is
    an error and nothing is left behind (the files are written to a temporary folder, renamed into place at the end).
    """
    from apex_cli.export.writer import export_checkpoint

    with stderr.status("exporting") as status:
        result = export_checkpoint(ckpt, export_format, out, overwrite, on_stage=lambda text: status.update(text))
    if as_json:
        typer.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}))
        return
    stdout.print(
        f"exported {result.checkpoint} as {result.format}: {result.out}", markup=False, highlight=False, soft_wrap=True
    )
    what = "velocities" if result.teacher else "samples"
    stdout.print(f"round trip: the {what} match the checkpoint's (max abs difference {result.max_abs_diff:.2g})")
    if result.teacher:
        load = (
            f'pipe.load_lora_weights("{result.out}") on the stock pipeline of {result.base}'
            if result.format == "lora"
            else f'pipe.transformer = <Transformer>.from_pretrained("{result.out / "transformer"}")'
        )
        stdout.print(
            f"load it: {load}; the target-time embedder (the one-step map F(z, 1, 0)) is in "
            f"{result.out / 'target_time_embedder.safetensors'}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    elif result.format == "diffusers":
        stdout.print(
            f'load it: DiffusionPipeline.from_pretrained("{result.out}", trust_remote_code=True)',
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    elif result.format == "lora":
        stdout.print(
            f"apply it to its base, exported with `apex export --ckpt {result.base} --format diffusers`: "
            f'pipe.load_lora_weights("{result.out}"), then its sampler: pipe.scheduler = '
            f'pipe.scheduler.from_config(json.load(open("{result.out / "apex_sampler.json"}")))',
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
