"""The 2-D toy velocity model: an MLP ``F(x_t, t, r, class)`` used to prove the objective on mixtures."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from apex_cli.core.objective import Condition


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t`` (any sign) followed by a two-layer MLP; ``[B] -> [B, dim]``."""

    def __init__(self, dim: int, max_period: float = 1000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half) * 1000.0
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """Embed times ``t: [B]``."""
        angles = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1).to(self.mlp[0].weight.dtype))


class Toy2dMLP(nn.Module):
    """``F(x_t, t, r, c)`` for 2-D points, conditioned on a class embedding (the "text projection" of E5).

    Target time (E4): ``embedder`` adds ``Emb1(t) + (t - r) Emb2(r)`` (E4a, the teacher exactly at r = t once
    ``Emb2`` is initialised as a copy of ``Emb1``); ``midpoint`` feeds the single input ``t - r / 2`` (E4b).
    The unconditional class ``e`` is the extra embedding row ``num_classes``.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        depth: int = 4,
        embed_dim: int = 64,
        target_time: str = "embedder",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.target_time = target_time
        self.class_embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.time_embedding = TimeEmbedding(embed_dim)
        self.target_time_embedding = TimeEmbedding(embed_dim) if target_time == "embedder" else None
        layers: list[nn.Module] = [nn.Linear(2 + 2 * embed_dim, hidden_dim), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        layers.append(nn.Linear(hidden_dim, 2))
        self.net = nn.Sequential(*layers)

    @property
    def text_projection(self) -> nn.Module:
        """The class embedding: its output is the condition the shift acts on (E5)."""
        return self.class_embedding

    def unconditional(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The condition ``e`` repeated ``batch_size`` times."""
        return {"labels": torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)}

    def init_target_time_embedder(self) -> None:
        """Copy ``Emb1`` into ``Emb2`` (E4a) so that the student equals the teacher at ``r = t``."""
        if self.target_time_embedding is not None:
            self.target_time_embedding.load_state_dict(self.time_embedding.state_dict())

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Average velocity from ``t`` to ``r``: ``x_t: [B, 2]``, ``t, r: [B]``, ``cond['labels']: [B]``."""
        if self.target_time_embedding is None:
            time = self.time_embedding(t - r / 2)
        else:
            time = self.time_embedding(t) + (t - r)[:, None].to(x_t.dtype) * self.target_time_embedding(r)
        h = self.class_embedding(cond["labels"])
        return self.net(torch.cat([x_t, time.to(x_t.dtype), h.to(x_t.dtype)], dim=1))

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Same as :meth:`velocity` (so hooks and wrappers see an ordinary forward)."""
        return self.velocity(x_t, t, r, cond)
