"""Which pixel-space denoiser to commit to for the shapes teacher: cost per step and GenEval after a fixed budget.

For each candidate (diffusers ``UNet2DConditionModel`` at two sizes, ``PixArtTransformer2DModel`` with 2x2 patches
and a ``caption_projection``), all sharing the frozen text encoder of ``apex_cli.models.shapes``:

1. parameter count; training step time at batch 64 (forward, backward, AdamW) in fp32 and under bf16 autocast,
   median of 3 after one warm-up; one no-grad forward at batch 64 (fp32 and bf16), median of 3;
2. plain flow matching for a fixed wall-clock budget: ``x_t = (1 - t) x + t z``, target ``z - x``,
   ``t ~ U(0, 1)``, AdamW (lr ``--lr``, 20-step warm-up, grad clip 1), batch 64 from ``shapes.training_stream``,
   10% of the rows with the empty prompt; the faster of fp32 / bf16 is used;
3. the quick GenEval suite (60 prompts x 2 images, 50 Euler steps from t = 1 to 0, GenEval seeds), scored with
   ``ShapesDetector``; optionally also with classifier-free guidance (``--guidance 0 2``).

    python bench/shapes_candidates.py                           # all candidates, 240 s each
    python bench/shapes_candidates.py --budget 30 --only unet-s  # a quick look

Writes bench/results/shapes_candidates.json (images under bench/runs/shapes_candidates/) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from apex_cli.core.objective import Condition
from apex_cli.core.sampler import SamplerSettings
from apex_cli.data import shapes
from apex_cli.eval.detectors import ShapesDetector
from apex_cli.eval.generate import generate
from apex_cli.eval.geneval import generate_images, one_prompt_at_a_time, prompt_seed, score_folder, summarize
from apex_cli.models.shapes import ShapesModel, images_to_tensor, parameter_count

ROOT = Path(__file__).resolve().parent
BATCH = 64
EULER_50 = SamplerSettings(style="mul", nfe=50, gap=(0.0, 0.0))
IMAGES_PER_PROMPT = 2

UNET_CANDIDATES: dict[str, dict[str, Any]] = {
    "unet-m": {
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "attention_heads": 4,
        "cross_attention_dim": 128,
    },
    "unet-s": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_heads": 2,
        "cross_attention_dim": 64,
    },
}
PIXART_CANDIDATES: dict[str, dict[str, Any]] = {
    "pixart-p2": {"num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 6},
}


class PixArtShapes(nn.Module):
    """``PixArtTransformer2DModel`` (2x2 patches, caption projection 64 -> width) on the shapes text stack.

    Plain flow matching only (``r`` is ignored): enough to compare sample efficiency with the UNet.
    """

    def __init__(self, text_model: ShapesModel, image_size: int, seed: int, **config: Any) -> None:
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer = PixArtTransformer2DModel(
                sample_size=image_size,
                patch_size=2,
                in_channels=3,
                out_channels=3,
                cross_attention_dim=config["num_attention_heads"] * config["attention_head_dim"],
                caption_channels=text_model.text_encoder.config.hidden_size,
                use_additional_conditions=False,
                **config,
            )
        self._size = image_size
        object.__setattr__(self, "_text_model", text_model)  # shared, not a submodule

    @property
    def image_size(self) -> int:
        """Image side."""
        return self._size

    @property
    def text_projection(self) -> nn.Module:
        """The caption projection."""
        return self.transformer.caption_projection

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """The shared cached text encoding."""
        return self._text_model.encode_prompts(prompts)

    def unconditional(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The empty prompt, repeated."""
        return self._text_model.unconditional(batch_size, device)

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Instantaneous velocity (``r`` ignored), ``[B, 3, H, W]``."""
        del r
        return self.transformer(
            x_t,
            encoder_hidden_states=cond["embeds"],
            timestep=t * 1000.0,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            encoder_attention_mask=cond["mask"],
        ).sample


def build(name: str, text_model: ShapesModel) -> nn.Module:
    """A fresh candidate. UNets are full ``ShapesModel``s (text encoder seed 0, UNet seed 1); PixArt shares
    ``text_model``'s text stack (also text seed 0), so every candidate sees the same text embeddings."""
    if name in UNET_CANDIDATES:
        return ShapesModel.build(seed=0, **UNET_CANDIDATES[name])
    return PixArtShapes(text_model, 32, seed=1, **PIXART_CANDIDATES[name])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with gradients (the text encoder is never one of them)."""
    return [p for p in model.parameters() if p.requires_grad]


def fm_loss(model: nn.Module, x: Tensor, cond: Condition, gen: torch.Generator) -> Tensor:
    """Flow-matching loss ``|F(x_t, t, t, c) - (z - x)|^2`` with ``t ~ U(0, 1)``."""
    z = torch.randn(x.shape, generator=gen)
    t = torch.rand(x.shape[0], generator=gen)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x + tb * z
    v = model.velocity(x_t, t, t, cond)  # type: ignore[operator]
    return (v.float() - (z - x)).pow(2).mean()


class Batches:
    """Batches of ``(images [-1, 1], condition)`` from the renderer, ``drop`` of the prompts replaced by ``""``."""

    def __init__(self, model: nn.Module, seed: int, drop: float = 0.1) -> None:
        self.model = model
        self.stream = shapes.training_stream(seed)
        self.rng = np.random.default_rng(seed + 1)
        self.drop = drop

    def next(self, batch: int) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = [next(self.stream) for _ in range(batch)]
        prompts = ["" if self.rng.random() < self.drop else p for p, _ in pairs]
        x = images_to_tensor(np.stack([image for _, image in pairs]))
        return x, self.model.encode_prompts(prompts)  # type: ignore[operator]


def autocast(enabled: bool) -> torch.autocast:
    """bf16 autocast on CPU when ``enabled``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def time_train_step(model: nn.Module, batches: Batches, bf16: bool, repeats: int = 3) -> float:
    """Median seconds of one training step (forward, backward, AdamW) at batch 64, after one warm-up."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-6)
    x, cond = batches.next(BATCH)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with autocast(bf16):
            loss = fm_loss(model, x, cond, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.no_grad()
def time_forward(model: nn.Module, batches: Batches, bf16: bool, repeats: int = 3) -> float:
    """Median seconds of one no-grad forward at batch 64, after one warm-up."""
    x, cond = batches.next(BATCH)
    t = torch.rand(BATCH)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with autocast(bf16):
            model.velocity(x, t, t, cond)  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def train(
    model: nn.Module, batches: Batches, budget_s: float, lr: float, bf16: bool, seed: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Flow matching for ``budget_s`` seconds of wall clock (data included); returns steps and the loss curve."""
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    steps, running, curve, data_s = 0, math.nan, [], 0.0
    while time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        x, cond = batches.next(BATCH)
        data_s += time.perf_counter() - t0
        with autocast(bf16):
            loss = fm_loss(model, x, cond, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        steps += 1
        value = loss.item()
        running = value if math.isnan(running) else 0.95 * running + 0.05 * value
        if steps % 25 == 0:
            curve.append([steps, round(time.perf_counter() - start, 1), round(running, 4)])
            log(f"  step {steps:5d}  {time.perf_counter() - start:6.1f}s  loss {running:.4f}")
    model.eval()
    elapsed = time.perf_counter() - start
    return {
        "steps": steps,
        "seconds": round(elapsed, 1),
        "data_seconds": round(data_s, 1),
        "final_loss": round(running, 4),
        "curve": curve,
    }


def geneval_quick(
    model: nn.Module, folder: Path, guidance: float, per_task: int = 10, chunk: int = 120
) -> dict[str, Any]:
    """Quick GenEval-shapes (``per_task`` = 10: 60 prompts x 2 images, 50 Euler steps), batches of ``chunk``."""
    rows = shapes.prompt_suite(seed=0, counts=dict.fromkeys(shapes.TASKS, per_task))
    jobs = [(row["prompt"], prompt_seed(0, i) + k) for i, row in enumerate(rows) for k in range(IMAGES_PER_PROMPT)]
    settings = SamplerSettings(style="mul", nfe=50, gap=(0.0, 0.0), guidance=guidance)
    start = time.perf_counter()
    images: dict[tuple[str, int], np.ndarray] = {}
    for i in range(0, len(jobs), chunk):
        part = jobs[i : i + chunk]
        out = generate(model, [p for p, _ in part], [s for _, s in part], settings)
        images.update({job: image for job, image in zip(part, out, strict=True)})
    sample_s = time.perf_counter() - start

    def lookup(prompt: str, seeds: list[int]) -> list[np.ndarray]:
        return [images[(prompt, s)] for s in seeds]

    generate_images(rows, folder, one_prompt_at_a_time(lookup), IMAGES_PER_PROMPT, seed=0)
    summary = summarize(score_folder(folder, ShapesDetector()))
    return {
        "overall": round(summary["overall"], 4),
        "tasks": {tag: round(task["accuracy"], 3) for tag, task in summary["tasks"].items()},
        "sampling_seconds": round(sample_s, 1),
    }


def run_candidate(name: str, args: argparse.Namespace, text_model: ShapesModel, log: Callable[[str], None]) -> dict:
    """Timings, training and GenEval of one candidate."""
    probe = build(name, text_model)
    batches = Batches(probe, seed=1000)
    result: dict[str, Any] = {"params": parameter_count(probe), "config": _config(name)}
    result["train_step_s"] = {
        "fp32": round(time_train_step(probe, batches, False), 3),
        "bf16": round(time_train_step(probe, batches, True), 3),
    }
    result["forward_s"] = {
        "fp32": round(time_forward(probe, batches, False), 3),
        "bf16": round(time_forward(probe, batches, True), 3),
    }
    del probe
    bf16 = result["train_step_s"]["bf16"] < 0.9 * result["train_step_s"]["fp32"]
    log(f"{name}: {result['params'] / 1e6:.2f}M params, step {result['train_step_s']}, forward {result['forward_s']}")
    model = build(name, text_model)
    result["precision"] = "bf16" if bf16 else "fp32"
    result["lr"] = args.lr
    result["training"] = train(model, Batches(model, seed=args.seed), args.budget, args.lr, bf16, args.seed, log)
    result["geneval"] = {}
    for g in args.guidance:
        folder = ROOT / "runs" / "shapes_candidates" / name / f"g{g:g}"
        result["geneval"][f"{g:g}"] = geneval_quick(model, folder, g, args.per_task)
        log(f"{name}: GenEval (guidance {g:g}) {result['geneval'][f'{g:g}']}")
    return result


def _config(name: str) -> dict[str, Any]:
    if name in UNET_CANDIDATES:
        return {"kind": "UNet2DConditionModel", **UNET_CANDIDATES[name]}
    return {"kind": "PixArtTransformer2DModel", "patch_size": 2, **PIXART_CANDIDATES[name]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds a candidate")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0])
    parser.add_argument("--per-task", type=int, default=10, help="GenEval prompts a task (10: the quick suite)")
    parser.add_argument("--only", nargs="+", default=None, help="candidate names")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "shapes_candidates.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    console = Console()
    names = args.only or [*UNET_CANDIDATES, *PIXART_CANDIDATES]
    text_model = ShapesModel.build(seed=0, block_out_channels=(8, 8), norm_num_groups=4, attention_heads=1)
    results: dict[str, Any] = {
        "settings": {
            "batch": BATCH,
            "budget_s": args.budget,
            "lr": args.lr,
            "threads": args.threads,
            "guidance": args.guidance,
            "suite": f"shapes, {args.per_task} prompts a task x {IMAGES_PER_PROMPT} images, 50 Euler steps",
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        },
        "candidates": {},
    }
    for name in names:
        results["candidates"][name] = run_candidate(name, args, text_model, console.print)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    table = Table(
        title=f"shapes denoisers: {args.budget:g} s of flow matching at batch {BATCH}, {args.threads} threads"
    )
    for column in ("candidate", "params", "step fp32", "step bf16", "fwd fp32", "fwd bf16", "steps", "loss"):
        table.add_column(column, justify="right")
    for g in args.guidance:
        table.add_column(f"GenEval g={g:g}", justify="right")
    for name, r in results["candidates"].items():
        table.add_row(
            name,
            f"{r['params'] / 1e6:.2f}M",
            f"{r['train_step_s']['fp32']:.3f}s",
            f"{r['train_step_s']['bf16']:.3f}s",
            f"{r['forward_s']['fp32']:.3f}s",
            f"{r['forward_s']['bf16']:.3f}s",
            str(r["training"]["steps"]),
            f"{r['training']['final_loss']:.4f}",
            *(f"{r['geneval'][f'{g:g}']['overall']:.3f}" for g in args.guidance),
        )
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
