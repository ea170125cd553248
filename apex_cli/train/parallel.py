"""Several processes: the launch ``apex distill`` makes of itself, and the DDP / FSDP2 layout of the models.

The recipe's ``hardware`` block decides everything; there is no launcher configuration besides it.

- **Launch** (:func:`launch_command`): with ``hardware.processes * hardware.nodes > 1``, ``apex distill`` runs itself
  again under ``torchrun`` (``python -m torch.distributed.run``), one process a GPU, on each node; the children see
  ``WORLD_SIZE`` and do not relaunch. On a GPU-less machine (CI, the tests) the processes use gloo on the CPU.
- **ddp**: ``torch.nn.parallel.DistributedDataParallel`` around the online model; every process holds the whole model
  and optimizer, gradients are averaged. ``broadcast_buffers=False`` (the models' buffers are constants), so forwards
  without gradient (references, monitor) need no collective; ``gradient_as_bucket_view=True`` (no second copy of
  the gradients); ``find_unused_parameters=True`` (a last block's text branch gets no gradient).
- **fsdp**: torch's FSDP2 ``fully_shard`` on each transformer block, then on the whole generator (the root: the
  embedders, the final layer and the E4a ``Emb2``); ``register_fsdp_forward_method`` makes ``velocity`` an FSDP entry
  point. An EMA copy or a frozen full copy (``reference: frozen`` without LoRA) is sharded the same way, so each
  process holds 1 / N of it; a LoRA EMA holds DTensor shards of the adapters. ``cpu_offload`` keeps the shards on the
  CPU (``CPUOffloadPolicy``). Every forward of a sharded module is a collective, so every process runs the same calls.
- **Checkpoints**: the full state dict is gathered with ``torch.distributed.checkpoint.state_dict`` (``full_state_dict,
  cpu_offload``) on every process, and process 0 writes it as one process would; a LoRA run writes only the adapters
  and ``Emb2``. Such a checkpoint loads in a single process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from apex_cli.config import Recipe
from apex_cli.core.objective import Condition
from apex_cli.errors import ApexError


@dataclass(frozen=True)
class Layout:
    """This process's place: ``rank`` of ``world`` processes, ``strategy`` ``ddp`` or ``fsdp``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        """Process 0: the one that writes files and prints progress."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the models are FSDP-sharded."""
        return self.world > 1 and self.strategy == "fsdp"

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (a picklable object), on every process."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def mean(self, values: Tensor) -> Tensor:
        """The mean over processes of a float tensor (the tensor itself alone)."""
        if self.world == 1:
            return values
        total = values.detach().clone()
        dist.all_reduce(total)
        return total / self.world


def launch_command(recipe_arg: str, overrides: list[str], flags: list[str], recipe: Recipe) -> list[str] | None:
    """The ``torchrun`` command that runs this ``apex distill`` on every process, or None when one process suffices
    (or this already is one of the launched processes).

    Args:
        recipe_arg: The ``--recipe`` value as given.
        overrides: The ``--set`` values as given.
        flags: Other flags to pass on (``--resume``, ...).
        recipe: The resolved recipe (its ``hardware`` block).
    """
    hardware = recipe.hardware
    if hardware.world_size == 1 or "WORLD_SIZE" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={hardware.processes}"]
    if hardware.nodes > 1:
        command += [f"--nnodes={hardware.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={hardware.rdzv_endpoint}"]
    else:
        command += ["--standalone"]
    command += ["-m", "apex_cli", "distill", "--recipe", recipe_arg]
    for item in overrides:
        command += ["--set", item]
    return command + flags


def init_layout(recipe: Recipe) -> Layout:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` set); a single process needs nothing.

    Raises:
        ApexError: The launch's world size differs from the recipe's ``hardware`` block.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Layout()
    if world != recipe.hardware.world_size:
        raise ApexError(
            f"launched as {world} processes, but hardware.processes * hardware.nodes = {recipe.hardware.world_size}",
            hint="run plain `apex distill`: it launches torchrun itself from the recipe's hardware block",
        )
    cuda = recipe.hardware.device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Layout(dist.get_rank(), world, local_rank, recipe.hardware.strategy)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a generator's network: the entries of every ``*blocks`` ModuleList of its adapted module
    (``transformer_blocks``, FLUX's ``single_transformer_blocks``)."""
    adapted = getattr(model, model.ADAPTED_MODULE)  # type: ignore[attr-defined]
    return [
        block
        for name, child in adapted.named_children()
        if name.endswith("blocks") and isinstance(child, nn.ModuleList)
        for block in child
    ]


def shard(model: nn.Module, cpu_offload: bool = False) -> None:
    """FSDP2: ``fully_shard`` each block, then the whole generator, and make ``velocity`` an entry point."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    register_fsdp_forward_method(model, "velocity")


class Replicated:
    """A velocity model whose forwards go through ``DistributedDataParallel`` (so its gradients are averaged);
    everything else is the wrapped model's."""

    def __init__(self, module: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.module = module
        # find_unused_parameters: the last dual-stream block's text branch feeds nothing (only image tokens are
        # read out), so some parameters never get a gradient.
        self.ddp = DistributedDataParallel(
            module, broadcast_buffers=False, gradient_as_bucket_view=True, find_unused_parameters=True
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """``F(x_t, t, r, c)`` through DDP (the module's ``forward`` is its ``velocity``)."""
        return self.ddp(x_t, t, r, cond)  # type: ignore[no-any-return]


def full_state_dict(module: nn.Module, layout: Layout, keys: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    """The module's full (unsharded) state dict on CPU, on process 0 (``{}`` elsewhere under FSDP); a collective
    under FSDP, so every process calls it.

    Args:
        module: A plain, DDP-wrapped or FSDP-sharded module.
        layout: This process's layout.
        keys: Keep only these keys (a LoRA model's trainable ones).
    """
    if layout.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = module.state_dict()
    return state if keys is None else {key: state[key] for key in keys if key in state}


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """DTensor shards gathered into full tensors (a collective); plain tensors as they are."""
    return {key: value.full_tensor() if hasattr(value, "full_tensor") else value for key, value in tensors.items()}


def load_full_state_dict(module: nn.Module, state: dict[str, Tensor], layout: Layout) -> None:
    """Load a full state dict (a subset of keys is fine) into a plain or FSDP-sharded module."""
    if not layout.sharded:
        module.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))
