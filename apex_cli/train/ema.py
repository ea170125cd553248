"""The reference and rollout networks of E7 / E8: an EMA of the weights, or the frozen base, at the least memory.

- :class:`EMA` (full fine-tuning): a frozen copy of the model whose weights track the online ones. Under FSDP the copy
  is sharded like the online model (``train/parallel.py``), so each process holds 1 / N of it.
- :class:`AdapterEMA` (LoRA): the EMA of the tensors that train (adapters and the E4a embedder) only; its ``model``
  evaluates the online network with those tensors swapped in (:class:`SwappedWeights`). It costs the adapters' size,
  not a second 20B transformer.
- :class:`AdaptersDisabled` (LoRA, ``reference: frozen``): the online network with its adapters switched off, which is
  exactly the frozen base (E7) and costs no memory at all.

Both warm up the decay as ``mu_{k+1} = mu_k + (1 - mu_k)(ema - mu_k) / 2`` from ``mu_0 = 0`` toward ``ema``, so early
updates follow the online weights closely.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from apex_cli.core.objective import Condition
from apex_cli.errors import CheckpointError


def local(tensor: Tensor) -> Tensor:
    """The process's own shard of an FSDP2 ``DTensor`` (the tensor itself otherwise), for in-place updates."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor  # type: ignore[no-any-return]


def reshard(*modules: Any) -> None:
    """Put FSDP2 modules back in their sharded state (a no-op for plain ones).

    FSDP2 leaves the root's parameters unsharded after a forward; the EMA works on the shards.
    """
    for module in modules:
        if hasattr(module, "reshard"):
            module.reshard()


class _Decay:
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.current_decay = 0.0

    def _next_weight(self) -> float:
        """Advance the warm-up and return the lerp weight ``1 - mu`` of this update."""
        mu = self.current_decay
        self.current_decay = mu + (1 - mu) * (self.decay - mu) / 2
        return 1 - self.current_decay


class EMA(_Decay):
    """A frozen copy whose weights track the online model.

    Args:
        model: The online model (copied once, before any sharding).
        decay: The target decay ``ema`` in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(decay)
        self.model: Any = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward the online weights (no host-device sync; on each process's shards under FSDP)."""
        weight = self._next_weight()
        reshard(self.model, model)
        ema_params = [local(p) for p in self.model.parameters()]
        online_params = [local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema_params, online_params, weight)


class SwappedWeights:
    """A velocity model: the online network evaluated with other values of its trainable tensors (the EMA's).

    The values are exchanged through ``.data`` for the length of one call and put back before it returns, so the
    online forward's autograd graph (built before this call) sees its own weights in the backward pass. Under FSDP the
    exchange is on each process's shards, and the all-gather of the call gathers the swapped values.

    Args:
        module: The online model (its ``trainable_state_dict`` keys name the tensors).
        call: What evaluates it (``module.velocity``, or the DDP / FSDP entry point of ``train/parallel.py``).
        shadow: Name -> tensor of the same shape (and sharding) as the trainable parameter of that name.
    """

    def __init__(self, module: nn.Module, call: Any, shadow: dict[str, Tensor]) -> None:
        self.module, self.call, self.shadow = module, call, shadow
        self.params = dict(module.named_parameters())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def eval(self) -> SwappedWeights:
        """Put the module in eval mode; return this view (as ``nn.Module.eval`` returns the module)."""
        self.module.eval()
        return self

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """``F(x_t, t, r, c)`` with the shadow values; the module in eval mode (no adapter dropout) for the call."""
        names = list(self.shadow)
        reshard(self.module)  # FSDP: the next forward gathers the swapped shards
        targets = [local(self.params[n]).data for n in names]
        saved = [t.clone() for t in targets]
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                torch._foreach_copy_(targets, [local(self.shadow[n]) for n in names])
            return self.call(x_t, t, r, cond)  # type: ignore[no-any-return]
        finally:
            reshard(self.module)
            with torch.no_grad():
                torch._foreach_copy_(targets, saved)
            self.module.train(was_training)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The shadow tensors, under the keys of the online model's ``trainable_state_dict``."""
        return dict(self.shadow)

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy saved EMA tensors into the shadow, strictly on keys and shapes.

        Raises:
            CheckpointError: A key is missing or unexpected, or a shape differs.
        """
        if set(state) != set(self.shadow) or any(state[k].shape != self.shadow[k].shape for k in state):
            raise CheckpointError("the saved EMA weights do not fit the adapters of this model")
        with torch.no_grad():
            for key, value in state.items():
                self.shadow[key].copy_(value)


class AdapterEMA(_Decay):
    """EMA of the trainable tensors of a LoRA model only; ``model`` is the online network with them swapped in.

    Args:
        module: The online model, after ``add_lora`` (and after sharding, so the shadow is sharded alike).
        decay: The target decay ``ema`` in (0, 1).
        call: How to evaluate the module (default: ``module.velocity``).
    """

    def __init__(self, module: nn.Module, decay: float, call: Any = None) -> None:
        super().__init__(decay)
        shadow = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
        self.model = SwappedWeights(module, call or module.velocity, shadow)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step of the shadow toward the online trainable tensors."""
        weight = self._next_weight()
        reshard(model)
        names = list(self.model.shadow)
        params = dict(model.named_parameters())
        torch._foreach_lerp_(
            [local(self.model.shadow[n]) for n in names], [local(params[n].detach()) for n in names], weight
        )


class AdaptersDisabled:
    """A velocity model: the online LoRA network with its adapters off, i.e. the frozen base (E7, ``frozen``).

    The E4a target-time embedder stays on, but the objective evaluates the reference at ``r = t`` only, where its
    term ``(t - r) Emb2(r)`` is exactly zero.

    Args:
        module: The online model with adapters (``adapters_disabled`` context).
        call: How to evaluate it (default: ``module.velocity``).
    """

    def __init__(self, module: nn.Module, call: Any = None) -> None:
        self.module, self.call = module, call or module.velocity

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """``F_base(x_t, t, r, c)``, the module in eval mode for the call."""
        was_training = self.module.training
        self.module.eval()
        try:
            with self.module.adapters_disabled():  # type: ignore[operator]
                return self.call(x_t, t, r, cond)  # type: ignore[no-any-return]
        finally:
            self.module.train(was_training)
