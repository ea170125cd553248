"""`apex export` of a student of a diffusers teacher (Qwen-Image, SANA, SD3, FLUX, Z-Image): ``lora`` and ``merged``.

``lora`` (LoRA runs only)::

    pytorch_lora_weights.safetensors   the adapters, as the stock <Pipeline>.load_lora_weights reads them
                                       (keys transformer.<module>.lora_A/B.weight, the peft config in the metadata)
    target_time_embedder.safetensors   Emb2, the E4a target-time embedder (it trains in full; not an adapter)
    apex_sampler.json, apex_export.json

``merged`` (LoRA runs: the adapters fused; full runs: the transformer as trained)::

    transformer/                       <Transformer>.save_pretrained: a drop-in for the pipeline's transformer
    target_time_embedder.safetensors   Emb2, as above
    one_step_time_bias.safetensors     Emb2's contribution at t = 1, r = 0 (below)
    apex_sampler.json, apex_export.json

A stock pipeline evaluates the transformer at ``r = t`` (``F(z, t, t)``: the student as an instantaneous-velocity
model, where Emb2 adds exactly zero). The one-step map is ``F(z, 1, 0)``, whose timestep embedding is
``Emb1(1) + Emb2(0)``; ``Emb2(0)`` is one constant vector, so adding it to the bias of the timestep MLP's last linear
layer makes the stock transformer *at t = 1* exactly the one-step map (and wrong at every other t). Only an NFE-1
sampler evaluates t = 1 alone, so that fold is not applied to ``transformer/``; ``one_step_time_bias.safetensors``
holds the vector under the bias's state-dict key, to add for one-step use::

    transformer.state_dict()[key].add_(delta)   # for key, delta in load_file("one_step_time_bias.safetensors")

Round trip: the written files are loaded as their users load them (the stock pipeline's ``load_lora_weights`` on a
fresh base, ``<Transformer>.from_pretrained``) and the velocities of fixed-seed latents and the round-trip prompts at
``r = t`` (t = 1 and 0.5) and the one-step map ``F(z, 1, 0)`` are compared with the checkpoint's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apex_cli.errors import ApexError, CheckpointError
from apex_cli.export.loading import SAMPLER_FILE, TARGET_TIME_FILE

LORA_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_FOLDER = "transformer"
ONE_STEP_BIAS_FILE = "one_step_time_bias.safetensors"
TEACHER_FORMATS = ("lora", "merged")
ROUND_TRIP_TIMES = (1.0, 0.5)
"""The ``t = r`` of the round trip's instantaneous velocities (the one-step map ``F(z, 1, 0)`` is compared too)."""


def check_teacher_format(recipe: Any, directory: Path, meta: dict[str, Any], export_format: str) -> None:
    """Refuse what a diffusers-teacher checkpoint cannot be exported as, with one line.

    Raises:
        CheckpointError: ``--format diffusers`` (not offered), or ``lora`` of a full fine-tune.
    """
    if export_format not in TEACHER_FORMATS:
        raise CheckpointError(
            f"{directory} holds a {recipe.model.name} student; apex export writes diffusers-teacher students as "
            f"--format {' or '.join(TEACHER_FORMATS)}, not {export_format}",
            hint="--format lora: adapters for the stock pipeline's load_lora_weights; --format merged: the "
            "transformer with the adapters fused, a drop-in for the pipeline's own",
        )
    if export_format == "lora" and not meta.get("adapters"):
        raise CheckpointError(
            f"{directory} is a full fine-tune (every weight trained), not LoRA adapters, so it has no --format lora",
            hint="use --format merged for a full model; LoRA runs set model.lora in the recipe",
        )


def write_and_verify(folder: Path, checkpoint: Path, export_format: str, record: dict[str, Any]) -> float:
    """Write the ``lora`` or ``merged`` export of ``checkpoint`` into ``folder``; return the round trip's max abs
    velocity difference."""
    from apex_cli.train.tasks import load_checkpoint_model

    model, recipe, _ = load_checkpoint_model(checkpoint)
    x, cond = round_trip_inputs(model, recipe.data.image_size)
    expected = student_velocities(model, x, cond)
    if export_format == "lora":
        model.save_lora_weights(folder)  # type: ignore[operator]
    else:
        write_merged_transformer(folder, model)
    (folder / SAMPLER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    generator_cls, transformer_cls = type(model), type(model.transformer)  # type: ignore[union-attr]
    del model
    if export_format == "lora":
        actual = lora_velocities(folder, recipe, x, cond)
    else:
        actual = merged_velocities(folder, generator_cls, transformer_cls, x, cond)
    return (actual - expected).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_merged_transformer(folder: Path, model: nn.Module) -> None:
    """``transformer/`` with the adapters fused, Emb2 and the one-step bias beside it (see the module docstring)."""
    from safetensors.torch import save_file

    delta_key, delta = one_step_bias(model)
    embedder = {k: v.detach().contiguous().cpu() for k, v in model.target_time_embedder.state_dict().items()}  # type: ignore[union-attr]
    if model.has_lora:  # type: ignore[union-attr]
        model.merge_lora()  # type: ignore[operator]
    model.transformer.save_pretrained(folder / TRANSFORMER_FOLDER)  # type: ignore[union-attr, operator]
    save_file(embedder, str(folder / TARGET_TIME_FILE))
    save_file({delta_key: delta.detach().contiguous().cpu()}, str(folder / ONE_STEP_BIAS_FILE))


@torch.no_grad()
def one_step_bias(model: nn.Module) -> tuple[str, Tensor]:
    """The transformer state-dict key of the timestep MLP's last bias and ``(t - r) Emb2(r)`` at ``t = 1, r = 0``."""
    embedder_path = model.TIME_EMBEDDER  # type: ignore[attr-defined]
    mlp = model.transformer.get_submodule(embedder_path)  # type: ignore[union-attr, operator]
    linears = [(n, m) for n, m in mlp.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    name, last = linears[-1]  # a LoRA-wrapped layer: its base_layer
    if last.bias is None:
        raise CheckpointError(f"the {model.FAMILY} timestep MLP's last layer has no bias to fold Emb2 into")  # type: ignore[attr-defined]
    time_proj = model.transformer.get_submodule(model.TIME_PROJ)  # type: ignore[union-attr, operator, attr-defined]
    zero = torch.zeros(1, device=last.bias.device)
    dtype = last.bias.dtype
    delta = model.target_time_embedder(time_proj(model._time_proj_input(zero)).to(dtype))[0]  # type: ignore[operator, attr-defined]
    key = f"{embedder_path}.{name}.bias".replace(".base_layer.", ".")  # the key in the merged model
    return key, delta


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def round_trip_inputs(model: nn.Module, image_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Fixed-seed latents ``[2, C, h, w]`` and the conditions of the round-trip prompts."""
    from apex_cli.export.writer import ROUND_TRIP_PROMPTS, ROUND_TRIP_SEEDS

    shape = model.latent_shape(image_size, image_size)  # type: ignore[operator]
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in ROUND_TRIP_SEEDS])
    return x, model.encode_prompts(list(ROUND_TRIP_PROMPTS))  # type: ignore[operator]


@torch.no_grad()
def student_velocities(model: nn.Module, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """``F(x, t, t)`` at each of :data:`ROUND_TRIP_TIMES`, then ``F(x, 1, 0)``, stacked: ``[3, B, C, h, w]``."""
    batch = x.shape[0]
    rows = [model.velocity(x, torch.full((batch,), t), torch.full((batch,), t), cond) for t in ROUND_TRIP_TIMES]  # type: ignore[operator]
    rows.append(model.velocity(x, torch.ones(batch), torch.zeros(batch), cond))  # type: ignore[operator]
    return torch.stack(rows).float()


@torch.no_grad()
def stock_velocity(generator_cls: Any, transformer: nn.Module, x: Tensor, t: float, cond: dict[str, Tensor]) -> Tensor:
    """``transformer`` called as the family's stock pipeline calls it at time ``t`` (no Emb2 hook involved)."""
    bare = generator_cls.bare(transformer)
    timestep = bare._transformer_timestep(torch.full((x.shape[0],), t))
    dtype = next(transformer.parameters()).dtype
    return bare._forward(x.to(dtype), timestep, cond).float()


@torch.no_grad()
def lora_velocities(folder: Path, recipe: Any, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """The round-trip velocities of a fresh base pipeline after the stock ``load_lora_weights(folder)`` (strict on
    keys) and Emb2 loaded from its file."""
    from safetensors.torch import load_file

    from apex_cli.train.tasks import build_task

    base = build_task(recipe).build_model().eval()
    check_lora_keys(base.pipeline, folder)  # type: ignore[union-attr]
    base.target_time_embedder.load_state_dict(load_file(str(folder / TARGET_TIME_FILE)))  # type: ignore[union-attr]
    return student_velocities(base, x, cond)


def check_lora_keys(pipeline: Any, folder: Path) -> None:
    """``pipeline.load_lora_weights(folder)``, then check that every saved adapter tensor landed, unchanged.

    Raises:
        ApexError: Keys are missing or unexpected on either side.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    pipeline.load_lora_weights(str(folder), adapter_name="default")
    saved = {k.removeprefix("transformer."): v for k, v in load_file(str(folder / LORA_FILE)).items()}
    loaded = get_peft_model_state_dict(pipeline.transformer, adapter_name="default")
    missing, unexpected = sorted(set(saved) - set(loaded)), sorted(set(loaded) - set(saved))
    if missing or unexpected or any(not torch.equal(loaded[k].cpu(), v) for k, v in saved.items()):
        raise ApexError(
            f"round trip failed: load_lora_weights left {len(missing)} adapter tensors unloaded (e.g. {missing[:1]}) "
            f"and {len(unexpected)} unexpected (e.g. {unexpected[:1]}), or changed their values",
            hint="this is a bug in apex export; please report it with the output of APEX_DEBUG=1",
        )


@torch.no_grad()
def merged_velocities(
    folder: Path, generator_cls: Any, transformer_cls: Any, x: Tensor, cond: dict[str, Tensor]
) -> Tensor:
    """The round-trip velocities of ``transformer/`` loaded with its class's stock ``from_pretrained``: at ``r = t``
    as is, and the one-step map with ``one_step_time_bias`` added."""
    from safetensors.torch import load_file

    transformer = transformer_cls.from_pretrained(folder / TRANSFORMER_FOLDER).eval()
    rows = [stock_velocity(generator_cls, transformer, x, t, cond) for t in ROUND_TRIP_TIMES]
    state = transformer.state_dict()
    for key, delta in load_file(str(folder / ONE_STEP_BIAS_FILE)).items():
        state[key].add_(delta.to(state[key].dtype))
    rows.append(stock_velocity(generator_cls, transformer, x, 1.0, cond))
    return torch.stack(rows)
