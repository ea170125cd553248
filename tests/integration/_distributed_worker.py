"""Run by torchrun from test_distributed.py: one process of a tiny distillation; writes this rank's weights.

Usage: python -m torch.distributed.run --nproc-per-node 2 _distributed_worker.py RECIPE.yaml OUT_DIR
"""

import os
import sys

import torch
from safetensors.torch import save_file

from apex_cli.config import load_recipe
from apex_cli.train import loop

captured = {}
arrange = loop._arrange


def _capture(recipe, model, teacher, layout):
    captured["model"] = model
    return arrange(recipe, model, teacher, layout)


loop._arrange = _capture
torch.set_num_threads(1)
recipe = load_recipe(sys.argv[1])
loop.run_distillation(recipe)
state = {}
for key, value in captured["model"].state_dict().items():
    local = value.to_local() if hasattr(value, "to_local") else value  # FSDP: this rank's shard
    state[key] = local.detach().contiguous().cpu()
save_file(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
