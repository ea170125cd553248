"""What stops the one-step student: the network's capacity, or generalisation from too few teacher pairs?

`apex distill` with `method.regression_pairs`, where the pool of teacher ODE pairs comes from one of:

- ``suite``: the quick GenEval-shapes suite itself, its exact prompts and evaluation noises (60 prompts x 4
  images = 240 pairs). The student's NFE-1 score on that suite then measures how well it fits pairs it trained on:
  an upper bound on what this network can draw in one step, NOT a result (it trains on the test set).
- ``cached:PATH``: a pool written by an earlier run (``<run>/teacher-pairs.safetensors``), so several runs share
  one pool without paying for the teacher's 50 steps again.
- ``fresh``: the recipe's own pool from the training stream, as `apex distill` makes it.

Everything after ``--`` is passed to `apex distill`. The run writes its own ``metrics.json`` (the report table);
checkpoints are scored with `apex eval geneval --ckpt ... --prompts shapes-quick`. Example (pure regression on the
suite's pairs, 1000 steps, one thread):

    python bench/pairs_fit.py suite -- distill --recipe shapes-apex-pairs-cpu \
        --set method.regression_pairs=240 --set 'method.roles={e2e: 1, mul: 0, any: 0, adv: 0}' \
        --set method.dist_match_coef=0 --set train.steps=1000 --set hardware.num_threads=1 \
        --set output.dir=bench/runs/pairs_fit/suite

The measured numbers and the commands behind them are in docs/benchmarks.md ("What limits NFE 1").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from apex_cli.core.sampler import sample
from apex_cli.data import shapes
from apex_cli.eval.geneval import prompt_seed
from apex_cli.train import loop
from apex_cli.train.pairs import GENERATE_BATCH, TeacherPairs
from apex_cli.train.shapes import REPORT_COUNTS, REPORT_IMAGES_PER_PROMPT, REPORT_SEED


@torch.no_grad()
def suite_pairs(teacher, conditions, unconditional, n, sample_shape, settings, seed, advance=None):
    """``generate_pairs`` for the report's GenEval suite: its prompts, and the noises its images start from."""
    rows = shapes.prompt_suite(seed=0, counts=REPORT_COUNTS)
    prompts, seeds = [], []
    for i, row in enumerate(rows):
        s = prompt_seed(REPORT_SEED, i)
        for k in range(REPORT_IMAGES_PER_PROMPT):
            prompts.append(row["prompt"])
            seeds.append(s + k)
    if len(prompts) != n:
        raise SystemExit(f"the suite has {len(prompts)} images: set method.regression_pairs={len(prompts)}")
    z = torch.stack([torch.randn(sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond = teacher.encode_prompts(prompts)
    xs = []
    for a in range(0, n, GENERATE_BATCH):
        b = min(a + GENERATE_BATCH, n)
        c = {k: v[a:b] for k, v in cond.items()}
        xs.append(sample(teacher, z[a:b], c, settings, uncond=unconditional(b - a)))
        if advance:
            advance(b - a)
    return TeacherPairs(z=z, x=torch.cat(xs), cond=cond)


def cached_pairs(path: Path):
    """``generate_pairs`` that reads a pool an earlier run wrote."""

    def generate(teacher, conditions, unconditional, n, sample_shape, settings, seed, advance=None):
        pool = TeacherPairs.load(path, next(teacher.parameters()).device)
        if len(pool) != n:
            raise SystemExit(f"{path} holds {len(pool)} pairs: set method.regression_pairs={len(pool)}")
        return pool

    return generate


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    mode = sys.argv[1]
    if mode == "suite":
        loop.generate_pairs = suite_pairs
    elif mode.startswith("cached:"):
        loop.generate_pairs = cached_pairs(Path(mode.split(":", 1)[1]))
    elif mode != "fresh":
        raise SystemExit(f"unknown pool {mode!r}: suite, cached:PATH or fresh")
    sys.argv = ["apex", *sys.argv[3:]]
    from apex_cli.cli.app import main as apex

    apex()


if __name__ == "__main__":
    main()
