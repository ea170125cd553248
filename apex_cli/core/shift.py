"""Condition shifting (method.md section 4, E5): the fake branch of APEX.

The same network evaluated under a shifted text condition ``S(c)`` learns the velocity of the generator's
own samples. ``S`` acts on the *projected* text tokens ``h`` (the output of the model's text-projection
module: Qwen-Image ``txt_in``, SANA ``caption_projection``, SD3/FLUX ``context_embedder``), for the rows of
the fake branch only. It is applied with a forward hook driven by a per-sample boolean mask, so no model
class is edited and LoRA / FSDP wrappers keep working. Masks and positional encodings are untouched.

Operators (recipe field ``method.shift``):
    negate                 h -> -h                                   (E5, default)
    affine                 h -> h A^T + b, A a fixed seeded orthogonal matrix, b a fixed seeded offset
    negative_time          h unchanged; the fake rows see -t and -r   (TwinFlow baseline)
    negate+negative_time   both                                      (the released Qwen-Image code)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

SHIFT_NAMES = ("negate", "affine", "negative_time", "negate+negative_time")


@dataclass
class ConditionShift:
    """One condition-shift operator ``S``.

    Attributes:
        name: One of ``SHIFT_NAMES``.
        seed: Seed of the fixed orthogonal matrix and offset of ``affine``.
        affine_offset_scale: Scale of the offset ``b`` of ``affine``.
    """

    name: str
    seed: int = 0
    affine_offset_scale: float = 0.5
    _affine_cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.name not in SHIFT_NAMES:
            raise ValueError(f"unknown condition shift {self.name!r}; expected one of {SHIFT_NAMES}")

    @property
    def shifts_condition(self) -> bool:
        """Whether ``S`` changes the projected text tokens."""
        return self.name != "negative_time"

    @property
    def negates_time(self) -> bool:
        """Whether the fake rows see ``-t`` and ``-r`` (TwinFlow's marker)."""
        return self.name.endswith("negative_time")

    def transform(self, h: Tensor) -> Tensor:
        """Apply ``S`` to every row of ``h`` (shape ``[B, ..., D]``; the operator acts on the last axis)."""
        if self.name in ("negate", "negate+negative_time"):
            return -h
        if self.name == "affine":
            matrix, offset = self._affine(h.shape[-1], h)
            return h @ matrix.T + offset
        return h

    def _affine(self, dim: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (dim, str(like.device))
        if key not in self._affine_cache:
            gen = torch.Generator().manual_seed(self.seed)
            q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix
            offset = self.affine_offset_scale * torch.randn(dim, generator=gen, dtype=torch.float64)
            self._affine_cache[key] = (q.to(like.device), offset.to(like.device))
        matrix, offset = self._affine_cache[key]
        return matrix.to(like.dtype), offset.to(like.dtype)

    def apply_rows(self, h: Tensor, mask: Tensor) -> Tensor:
        """Shift only the rows of ``h`` (``[B, ...]``) where ``mask`` (``[B]``, bool) is true."""
        if h.shape[0] != mask.shape[0]:
            raise ValueError(f"shift mask has {mask.shape[0]} rows but the condition has {h.shape[0]}")
        mask_b = mask.view(-1, *([1] * (h.ndim - 1)))
        return torch.where(mask_b, self.transform(h), h)

    def apply_time(self, t: Tensor, mask: Tensor) -> Tensor:
        """Negate ``t`` (``[B]``) on the masked rows when the operator marks the branch by time."""
        if not self.negates_time:
            return t
        return torch.where(mask, -t, t)


@contextmanager
def shifted_condition(projection: nn.Module, shift: ConditionShift, mask: Tensor) -> Iterator[None]:
    """Within the context, the output of ``projection`` is shifted on the rows selected by ``mask``.

    Args:
        projection: The model's text-projection module (its output is ``h``, ``[B, ..., D]``).
        shift: The operator ``S``.
        mask: ``[B]`` bool, true for the rows of the fake branch.
    """
    if not shift.shifts_condition:
        yield
        return

    def hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        return shift.apply_rows(output, mask)

    handle = projection.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
