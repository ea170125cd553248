"""Teacher ODE pairs for the e2e rows (``method.regression_pairs``, an extension of APEX [ours]).

Before the first step the teacher integrates ``n`` noises ``z`` to images ``x`` with its own multi-step sampler
(Euler, classifier-free guidance): pairs ``(z, x, c)`` of its deterministic noise-to-image map. The e2e rows
(t = 1, r = 0) then draw their noise, data and condition from this pool, so their E6 velocity ``z - x`` is the
exact one-step velocity of the teacher's ODE, and their target is that velocity itself (a regression, as in DMD's
regression loss, Yin et al. 2024, arXiv 2311.18828, section 3.3) instead of the E8 self-consistency estimate
built from independent noise. Only the e2e rows change; the mul, any and adv rows and E12 are as in method.md.

The pool is generated at the start of a run, written to the run directory (``teacher-pairs.safetensors``,
atomically) and read back when the run resumes, so a resumed run trains on the same pairs and never regenerates
them from trained weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from apex_cli.core.sampler import SamplerSettings, sample
from apex_cli.train.checkpoint import atomic_write_bytes

FILENAME = "teacher-pairs.safetensors"
COND_PREFIX = "cond."
GENERATE_BATCH = 64


@dataclass(frozen=True)
class TeacherPairs:
    """``n`` teacher ODE pairs: noise ``z`` [n, ...], the teacher's image ``x`` [n, ...] and their condition."""

    z: Tensor
    x: Tensor
    cond: dict[str, Tensor]

    def __len__(self) -> int:
        return self.z.shape[0]

    def draw(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``k`` pairs drawn uniformly with replacement: ``(z, x, cond)``."""
        index = torch.randint(len(self), (k,), generator=generator).to(self.z.device)
        return self.z[index], self.x[index], {key: value[index] for key, value in self.cond.items()}

    def save(self, path: Path) -> None:
        """Write the pool to ``path`` atomically (temp file in the same folder, then rename)."""
        tensors = {"z": self.z, "x": self.x, **{COND_PREFIX + k: v for k, v in self.cond.items()}}
        atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))

    @classmethod
    def load(cls, path: Path, device: torch.device) -> TeacherPairs:
        """Read a pool written by :meth:`save` onto ``device``."""
        tensors = load_file(str(path), device=str(device))
        cond = {k[len(COND_PREFIX) :]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
        return cls(z=tensors["z"], x=tensors["x"], cond=cond)


@torch.no_grad()
def generate_pairs(
    teacher: torch.nn.Module,
    conditions: Iterator[dict[str, Tensor]],
    unconditional: Callable[[int], dict[str, Tensor]],
    n: int,
    sample_shape: tuple[int, ...],
    settings: SamplerSettings,
    seed: int,
    advance: Callable[[int], None] | None = None,
) -> TeacherPairs:
    """Integrate ``n`` seeded noises with the teacher's sampler.

    Args:
        teacher: The frozen teacher (``F(x, t, t, c)`` is its velocity).
        conditions: Batches of conditions (any batch size); rows are taken in order until ``n`` are reached.
        unconditional: ``batch -> e`` for classifier-free guidance.
        n: How many pairs.
        sample_shape: Shape of one sample, e.g. ``(3, 32, 32)``.
        settings: The teacher's sampler (style ``mul``, its NFE and guidance).
        seed: Seeds the noises.
        advance: Called with the number of pairs each batch adds (a progress bar).
    """
    device = next(teacher.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    zs: list[Tensor] = []
    xs: list[Tensor] = []
    conds: list[dict[str, Tensor]] = []
    pending: dict[str, Tensor] | None = None
    done = 0
    while done < n:
        while pending is None or next(iter(pending.values())).shape[0] < min(GENERATE_BATCH, n - done):
            batch = next(conditions)
            pending = batch if pending is None else {k: torch.cat([pending[k], batch[k]]) for k in pending}
        k = min(GENERATE_BATCH, n - done)
        cond = {key: value[:k] for key, value in pending.items()}
        pending = {key: value[k:] for key, value in pending.items()}
        z = torch.randn((k, *sample_shape), generator=generator).to(device)
        uncond = unconditional(k) if settings.guidance else None
        x = sample(teacher, z, cond, settings, uncond=uncond)  # type: ignore[arg-type]
        zs.append(z)
        xs.append(x)
        conds.append(cond)
        done += k
        if advance is not None:
            advance(k)
    return TeacherPairs(
        z=torch.cat(zs), x=torch.cat(xs), cond={key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    )
