"""Cost of one APEX training step relative to one flow-matching step on the same model and batch.

Counts the network evaluations (calls and rows) each step makes and times the whole step (forward,
backward, optimizer), median of 20 after 5 warm-up steps.

    python bench/step_cost.py                       # the toy2d MLP, batch 256
    python bench/step_cost.py --batch 1024 --repeats 50

Writes bench/results/step_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from apex_cli.config import load_recipe
from apex_cli.core.objective import ObjectiveModels, apex_loss
from apex_cli.core.shift import ConditionShift
from apex_cli.train.ema import EMA
from apex_cli.train.loop import objective_settings
from apex_cli.train.toy2d import Toy2dTask

ROOT = Path(__file__).resolve().parent


class Counted(torch.nn.Module):
    """Wraps a model and counts its velocity calls and rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.rows = 0

    @property
    def text_projection(self) -> torch.nn.Module:
        return self.model.text_projection

    def velocity(self, x_t, t, r, cond):
        self.calls += 1
        self.rows += x_t.shape[0]
        return self.model.velocity(x_t, t, r, cond)


def measure(recipe_name: str, overrides: list[str], batch: int, repeats: int) -> dict[str, float]:
    recipe = load_recipe(recipe_name, [f"train.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    task = Toy2dTask(recipe)
    model = task.build_model()
    online = Counted(model)
    ema = EMA(model, recipe.method.ema_decay) if recipe.method.reference == "ema" else None
    reference = Counted(ema.model) if ema else online
    models = ObjectiveModels(online, reference, reference)
    settings, shift = objective_settings(recipe), ConditionShift(recipe.method.shift)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = task.batches(batch, 0, torch.device("cpu"))
    times = []
    for i in range(5 + repeats):
        x, cond = next(batches)
        online.calls = online.rows = reference.calls = reference.rows = 0
        start = time.perf_counter()
        out = apex_loss(models, x, cond, model.unconditional(batch), settings, shift)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        if i >= 5:
            times.append(time.perf_counter() - start)
    calls = online.calls + (reference.calls if reference is not online else 0)
    rows = online.rows + (reference.rows if reference is not online else 0)
    return {"median_seconds": statistics.median(times), "calls": calls, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "step_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = {
        "flow matching (toy2d-teacher method)": ("toy2d-teacher", ["method.cond_dropout=0"]),
        "APEX, N=2, lambda=0 (toy2d-apex)": ("toy2d-apex", []),
        "APEX, N=2, lambda=0.5 (E7 on)": ("toy2d-apex", ["method.enhanced_ratio=0.5"]),
        "APEX, N=1": ("toy2d-apex", ["method.estimate_order=1"]),
    }
    results = {
        name: measure(recipe, overrides, args.batch, args.repeats) for name, (recipe, overrides) in cases.items()
    }
    base = results["flow matching (toy2d-teacher method)"]["median_seconds"]
    table = Table(title=f"one training step, toy2d MLP, batch {args.batch}, median of {args.repeats}")
    for column in ("method", "median step (ms)", "x flow matching", "forward calls", "rows evaluated"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, row in results.items():
        row["ratio"] = row["median_seconds"] / base
        table.add_row(
            name, f"{1000 * row['median_seconds']:.2f}", f"{row['ratio']:.2f}", str(row["calls"]), str(row["rows"])
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "repeats": args.repeats, "results": results}, indent=2))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
