"""The catalogue of bad inputs: each invalid recipe or invocation exits 1 with one `Error:` line, no traceback.

Each case is an `apex` command line (through CliRunner) and the exact fragment its error line must hold.
``{tmp}`` is a fresh folder; ``{ckpt}`` a tiny shapes checkpoint (trained one step by the module fixture).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from typer.testing import CliRunner

from apex_cli.cli.app import app

ROW = '{{"tag": "single_object", "include": [{{"class": "circle", "count": 1}}], "prompt": "{prompt}"}}\n'
LONG_PROMPT = "a photo of a red circle and a green square and a blue triangle and a white circle"  # 18 words


@dataclass(frozen=True)
class Case:
    """One bad input: the arguments after `apex`, the files they refer to, and the error line's fragment."""

    id: str
    args: list[str]
    fragment: str
    files: dict[str, str] = field(default_factory=dict)


def distill(*overrides: str, recipe: str = "toy2d-apex", extra: tuple[str, ...] = ()) -> list[str]:
    """`apex distill` of a recipe with ``--set`` overrides, writing (if it ever got that far) under ``{tmp}``."""
    args = ["distill", "--recipe", recipe, "--set", "output.dir={tmp}/run", "--set", "hardware.num_threads=1"]
    for item in overrides:
        args += ["--set", item]
    return args + list(extra)


def geneval(*args: str) -> list[str]:
    """`apex eval geneval` of the tiny checkpoint, one image a prompt, into ``{tmp}``."""
    return ["eval", "geneval", "--ckpt", "{ckpt}", "--n", "1", "--out", "{tmp}/geneval", *args]


CASES = [
    # The recipe file itself.
    Case(
        "malformed-yaml", distill(recipe="{tmp}/bad.yaml"), "is not valid YAML at line 2", {"bad.yaml": "a: [1\nb: 2\n"}
    ),
    Case(
        "yaml-not-a-mapping", distill(recipe="{tmp}/list.yaml"), "must be a YAML mapping", {"list.yaml": "- a\n- b\n"}
    ),
    Case(
        "missing-section",
        distill(recipe="{tmp}/short.yaml"),
        "train: required key is missing",
        {"short.yaml": "name: short\nmodel: {name: toy2d-mlp}\ndata: {name: toy2d}\noutput: {dir: x}\n"},
    ),
    Case("unknown-recipe", distill(recipe="toy2d-apx"), "recipe 'toy2d-apx' not found"),
    # Keys and types.
    Case("unknown-section", distill("colour=red"), "colour: unknown key"),
    Case("unknown-key-suggests", distill("train.lrr=3"), "train.lrr: unknown key; did you mean 'lr'?"),
    Case("wrong-type", distill("train.steps=many"), "train.steps: Input should be a valid integer"),
    Case("section-not-a-mapping", distill("train=5"), "train: Input should be a valid dictionary"),
    Case("unknown-model", distill("model.name=unet9"), "model.name: unknown name 'unet9'"),
    Case("override-without-value", distill("train.lr"), "override 'train.lr' is not of the form key.sub=value"),
    Case("override-below-a-value", distill("train.lr.max=1"), "'lr' is not a section"),
    # Values that make no sense.
    Case("negative-lr", distill("train.lr=-1"), "train.lr: Input should be greater than 0 (got -1)"),
    Case("zero-steps", distill("train.steps=0"), "train.steps: Input should be greater than or equal to 1 (got 0)"),
    Case("zero-batch", distill("train.batch_size=0"), "train.batch_size: Input should be greater than or equal to 1"),
    Case("zero-grad-clip", distill("train.grad_clip=0"), "train.grad_clip: Input should be greater than 0"),
    Case("negative-warmup", distill("train.warmup_steps=-5"), "train.warmup_steps: Input should be greater than or"),
    Case("negative-keep-last", distill("train.keep_last=-1"), "train.keep_last: Input should be greater than or"),
    Case("zero-nonfinite-limit", distill("train.max_nonfinite_steps=0"), "train.max_nonfinite_steps: Input should be"),
    Case("zero-threads", distill("hardware.num_threads=0"), "hardware.num_threads: Input should be greater than or"),
    Case("ema-decay-above-1", distill("method.ema_decay=1.5"), "method.ema_decay: Input should be less than 1"),
    Case("delta-out-of-range", distill("method.delta=1"), "method.delta: Input should be less than 1"),
    Case("time-dist", distill("method.time_dist=[0, 1, 1]"), "time_dist [a, b, s] needs a > 0, b > 0, 0 < s <= 1"),
    Case("guidance-compounds", distill("method.enhanced_ratio=1"), "enhanced_ratio must be < 1 with reference 'ema'"),
    Case("monitor-fraction", distill("monitor.max_constant_fraction=2"), "monitor.max_constant_fraction: Input should"),
    Case("grid-needs-square", distill("data.layout=grid"), "layout 'grid' needs a square num_modes"),
    Case("image-size", distill("data.image_size=48", recipe="shapes-teacher-cpu"), "data.image_size: Input should"),
    # Roles and batch.
    Case(
        "roles-all-zero",
        distill("method.roles={e2e: 0, mul: 0, any: 0, adv: 0}", "method.dist_match_coef=0"),
        "method.roles: at least one role fraction must be > 0",
    ),
    Case("negative-role", distill("method.roles.adv=-1"), "method.roles.adv: Input should be greater than or equal"),
    Case(
        "split-without-adversary",
        distill("method.roles.adv=0"),
        "dist_match_coef > 0 needs roles.adv > 0 and roles.e2e > 0",
    ),
    Case(
        "batch-below-roles",
        distill("train.batch_size=3"),
        "train.batch_size (3) is smaller than the 4 active method.roles",
    ),
    # The sampler.
    Case("nfe-zero", distill("sampler.nfe=0"), "sampler.nfe: Input should be greater than or equal to 1"),
    Case(
        "unknown-sampler-style", distill("sampler.style=fast"), "sampler.style: Input should be 'few', 'any' or 'mul'"
    ),
    Case("gap", distill("sampler.gap=[0.6, 0.5]"), "gap [g0, g1] needs 0 <= g0 < 1 - g1 <= 1"),
    Case("unknown-shift", distill("method.shift=flip"), "method.shift: Input should be 'negate'"),
    # Paths: models and checkpoints.
    Case(
        "missing-model-path",
        distill("model.init={tmp}/no-teacher", "model.init_recipe=null"),
        "model.init: {tmp}/no-teacher does not exist",
    ),
    Case("unknown-shipped-model", distill("model.init=shipped:nope"), "no shipped checkpoint named 'nope'"),
    Case(
        "lora-without-base",
        distill("model.init=null", recipe="shapes-apex-lora-cpu"),
        "LoRA adapts a trained base model, so it needs model.init",
    ),
    Case("resume-without-checkpoint", distill(recipe="toy2d-teacher", extra=("--resume",)), "has no checkpoint yet"),
    Case(
        "resume-from-missing",
        distill(recipe="toy2d-teacher", extra=("--resume-from", "{tmp}/nowhere")),
        "checkpoint {tmp}/nowhere does not exist",
    ),
    Case("eval-missing-checkpoint", ["eval", "geneval", "--ckpt", "{tmp}/nothing"], "{tmp}/nothing does not exist"),
    # Prompts and evaluation settings.
    Case(
        "empty-prompt",
        geneval("--prompts", "{tmp}/p.jsonl"),
        "prompt 1 of 1 is empty",
        {"p.jsonl": ROW.format(prompt="")},
    ),
    Case(
        "out-of-vocabulary",
        geneval("--prompts", "{tmp}/p.jsonl"),
        "has words outside the shapes vocabulary: 'dragon'",
        {"p.jsonl": ROW.format(prompt="a photo of a dragon")},
    ),
    Case(
        "prompt-too-long",
        geneval("--prompts", "{tmp}/p.jsonl"),
        "has 18 words; the shapes model takes at most 15",
        {"p.jsonl": ROW.format(prompt=LONG_PROMPT)},
    ),
    Case("prompt-file-not-json", geneval("--prompts", "{tmp}/p.jsonl"), "p.jsonl:1: not JSON", {"p.jsonl": "{nope\n"}),
    Case("prompt-file-missing", geneval("--prompts", "{tmp}/none.jsonl"), "is neither 'shapes', 'shapes-quick' nor"),
    Case("eval-nfe-zero", geneval("--nfe", "0"), "--nfe '0': every NFE must be >= 1"),
    Case("eval-nfe-not-a-number", geneval("--nfe", "one"), "--nfe 'one' must be a comma-separated list of integers"),
    Case("eval-bad-shard", geneval("--shard", "3/2"), "--shard '3/2' is not of the form i/n"),
    Case("eval-two-sources", geneval("--images", "{tmp}"), "give exactly one of --images DIR or --ckpt PATH"),
    Case("fid-bad-reference", ["eval", "fid", "--images", "{tmp}", "--ref", "{tmp}/none"], "is neither 'shapes' nor"),
]


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes_teacher) -> str:
    return str(tiny_shapes_teacher)


def test_the_catalogue_has_at_least_25_distinct_cases() -> None:
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_exits_1_with_one_error_line(case: Case, tmp_path, request) -> None:
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    ckpt = request.getfixturevalue("checkpoint") if any("{ckpt}" in arg for arg in case.args) else ""
    args = [arg.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt) for arg in case.args]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a handled error, not a crash
    assert "Traceback" not in result.output
    assert len(errors) == 1, result.stderr
    assert case.fragment.replace("{tmp}", str(tmp_path)) in errors[0]
