"""Two processes on the CPU (torchrun, gloo): DDP keeps the replicas identical; FSDP2 shards the tiny Qwen-Image
transformer, trains, and writes a full checkpoint that loads in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from apex_cli.config import load_recipe
from apex_cli.train.tasks import build_task, load_checkpoint_model

WORKER = Path(__file__).with_name("_distributed_worker.py")


def _recipe(tmp_path: Path, strategy: str, lora: bool) -> Path:
    (tmp_path / "prompts.txt").write_text("a photo of a red circle\na photo of two squares\na blue triangle\n")
    raw = {
        "name": f"tiny-qwen-{strategy}",
        "model": {"name": "tiny-qwen-image", "lora": {"rank": 4} if lora else None},
        "data": {"name": "prompts", "path": str(tmp_path / "prompts.txt"), "image_size": 32},
        "method": {"enhanced_ratio": 0.5, "estimate_order": 1},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3},
        "monitor": {"every": 0},
        "hardware": {"device": "cpu", "precision": "fp32", "processes": 2, "strategy": strategy, "num_threads": 1},
        "output": {"dir": str(tmp_path / "run"), "evaluate": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run_worker(tmp_path: Path, strategy: str) -> tuple[dict, dict, dict]:
    """Both ranks' own parameters (FSDP: their shards) and the final checkpoint's weights."""
    recipe = _recipe(tmp_path, strategy, lora=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    arguments = [*command, str(WORKER), str(recipe), str(tmp_path)]
    done = subprocess.run(arguments, env=_env(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["total"] is not None for r in records)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    return rank0, rank1, load_file(str(tmp_path / "run" / "final" / "model.safetensors"))


def test_ddp_training_keeps_the_parameters_identical_on_both_ranks(tmp_path) -> None:
    rank0, rank1, saved = _run_worker(tmp_path, "ddp")
    assert set(rank0) == set(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)  # what process 0 wrote is what both hold
    fresh = build_task(load_recipe(str(tmp_path / "recipe.yaml"))).build_model().state_dict()
    assert any(not torch.equal(fresh[k], rank0[k]) for k in fresh)  # and they trained


def test_fsdp_holds_half_of_each_weight_per_rank_and_saves_the_gathered_whole(tmp_path) -> None:
    rank0, rank1, saved = _run_worker(tmp_path, "fsdp")
    key = "transformer.transformer_blocks.0.img_mlp.net.0.proj.weight"
    assert rank0[key].shape[0] == rank1[key].shape[0] == saved[key].shape[0] // 2  # sharded on dim 0
    assert all(torch.equal(torch.cat([rank0[k], rank1[k]])[: saved[k].shape[0]], saved[k]) for k in saved)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_shards_the_tiny_qwen_transformer_and_saves_a_full_checkpoint_that_loads_in_one_process(
    tmp_path, lora
) -> None:
    recipe = _recipe(tmp_path, "fsdp", lora=lora)
    # Through the CLI: `apex distill` relaunches itself under torchrun from the recipe's hardware block.
    command = [sys.executable, "-m", "apex_cli", "distill", "--recipe", str(recipe)]
    done = subprocess.run(command, env=_env(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"launching 2 processes" in done.stderr
    final = tmp_path / "run" / "final"
    weights = load_file(str(final / "model.safetensors"))
    model, _, meta = load_checkpoint_model(tmp_path / "run")  # one process, no process group
    if lora:  # adapters (and the target-time embedder) only
        assert meta["adapters"] and all(".lora_" in k or k.startswith("target_time_embedder.") for k in weights)
    else:
        full = build_task(load_recipe(str(recipe))).build_model().state_dict()
        assert set(weights) == set(full) and all(weights[k].shape == full[k].shape for k in full)  # unsharded
        assert any(not torch.equal(weights[k], full[k]) for k in full)  # trained
    ema = load_file(str(final / "ema.safetensors"))
    assert set(ema) == set(weights) and all(ema[k].shape == weights[k].shape for k in ema)
    state = model.trainable_state_dict() if lora else model.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)  # load_checkpoint_model takes the EMA weights
