from pathlib import Path

import pytest
import torch

TINY_SHAPES = [  # the shapes UNet shrunk to a fraction of a second a step: fp32, one thread, no report
    "train.batch_size=4",
    "model.block_out_channels=[16, 32]",
    "model.attention_heads=2",
    "model.cross_attention_dim=32",
    "model.norm_num_groups=8",
    "output.evaluate=false",
    "hardware.precision=fp32",
    "hardware.num_threads=1",
]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_shapes() -> list[str]:
    """Recipe overrides (``--set`` items) for a tiny shapes model."""
    return list(TINY_SHAPES)


@pytest.fixture(scope="session")
def tiny_shapes_teacher(tmp_path_factory, tiny_shapes) -> Path:
    """A run directory holding a tiny shapes teacher, trained one step."""
    from apex_cli.config import load_recipe
    from apex_cli.train.loop import run_distillation

    path = tmp_path_factory.mktemp("tiny-shapes-teacher") / "run"
    run_distillation(load_recipe("shapes-teacher-cpu", [*tiny_shapes, "train.steps=1", f"output.dir={path}"]))
    return path
