"""The 2-D proof with its ablations: APEX against the same run with the adversarial parts switched off.

Every variant distils the same teacher (trained once per layout) with the same budget (steps, batch, seed)
and is measured by the energy distance of 4,000 one-step samples to the true mixture.

    python bench/toy2d_ablation.py                 # ring-8 and grid-9, all variants, seed 0 (~30 min on 2 cores)
    python bench/toy2d_ablation.py --seeds 0 1     # more seeds
    python bench/toy2d_ablation.py --steps 1000    # a quicker check

Writes bench/results/toy2d_ablation.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apex_cli.config import load_recipe
from apex_cli.train.loop import run_distillation

ROOT = Path(__file__).resolve().parent
LAYOUTS = {"ring-8": "toy2d-apex", "grid-9": "toy2d-apex-grid"}
ADV_OFF = ["method.roles.adv=0", "method.dist_match_coef=0"]
VARIANTS = {
    "APEX N=2 (negate, EMA ref)": [],
    "APEX N=1": ["method.estimate_order=1"],
    "APEX negative_time shift": ["method.shift=negative_time"],
    "adversarial off, N=1": [*ADV_OFF, "method.estimate_order=1"],
    "adversarial off, N=2": ADV_OFF,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (default: the recipe's)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "toy2d_ablation.json")
    args = parser.parse_args()
    console = Console(stderr=True)
    runs = ROOT / "runs" / "toy2d"
    results = []
    for layout in args.layouts:
        recipe_name = LAYOUTS[layout]
        teacher_dir = runs / f"teacher-{layout}"
        for seed in args.seeds:
            for variant, overrides in VARIANTS.items():
                out_dir = runs / f"{layout}-{variant.replace(' ', '_').replace(',', '').replace('=', '')}-s{seed}"
                sets = [
                    f"model.init={teacher_dir}",
                    f"output.dir={out_dir}",
                    f"train.seed={seed}",
                    *overrides,
                    *([f"train.steps={args.steps}"] if args.steps else []),
                ]
                console.rule(f"{layout} | {variant} | seed {seed}")
                result = run_distillation(load_recipe(recipe_name, sets), overwrite=True, console=console)
                distances = result.metrics["energy_distance"]
                results.append(
                    {
                        "layout": layout,
                        "variant": variant,
                        "seed": seed,
                        "overrides": sets,
                        "student_1": distances["student_1"],
                        "teacher_1": distances["teacher_1"],
                        "teacher_50": distances["teacher_50"],
                        "floor": result.metrics["floor"],
                        "train_seconds": result.train_seconds,
                    }
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    table = Table(title="2-D proof: energy distance to the true mixture at NFE = 1 (lower is better)")
    for column in ("layout", "variant", "seed", "student NFE 1", "teacher NFE 1", "ratio", "teacher NFE 50", "floor"):
        table.add_column(column, justify="left" if column in ("layout", "variant") else "right")
    for row in results:
        table.add_row(
            row["layout"],
            row["variant"],
            str(row["seed"]),
            f"{row['student_1']:.4f}",
            f"{row['teacher_1']:.4f}",
            f"{row['student_1'] / row['teacher_1']:.3f}",
            f"{row['teacher_50']:.4f}",
            f"{row['floor']:.4f}",
        )
    Console(width=140).print(table)
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
