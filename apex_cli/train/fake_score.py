"""The DMD2 baseline's fake-score network as the training loop holds it: weights, optimizer, updates, state.

The math is in ``apex_cli/core/dmd.py`` (DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation for
Fast Image Synthesis", arXiv 2405.14867). Here: the network is a trainable copy of the student at the start of the
run, which is the teacher (E4a: at r = t the fresh student is exactly the teacher); it has its own AdamW (the
recipe's betas and weight decay, a constant learning rate ``fake_score.lr`` or ``train.lr``) and the recipe's
gradient clip, and makes ``fake_score.updates`` updates before each generator update, each on fresh one-step
samples of the current student for the batch's conditions. Checkpoints hold its weights (``fake_score.safetensors``)
and its optimizer state, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import Tensor, nn

from apex_cli.config import Recipe
from apex_cli.core.dmd import dmd_loss, fake_score_loss
from apex_cli.core.objective import Condition, LossOutput, ObjectiveModels, ObjectiveSettings, VelocityModel, one_step

WEIGHTS_STEM = "fake_score"
"""``fake_score.safetensors`` in a checkpoint."""


class FakeScore:
    """A separate fake-score network, its optimizer, and the real score (the frozen teacher) it is compared with.

    Args:
        recipe: The run's recipe (``method.fake_score`` must be set).
        model: The student at the start of the run (copied: the fake score starts as the teacher).
        real: The frozen teacher (a frozen copy, or for LoRA the student with its adapters off).
    """

    def __init__(self, recipe: Recipe, model: nn.Module, real: VelocityModel) -> None:
        config = recipe.method.fake_score
        if config is None:
            raise ValueError("FakeScore needs a recipe with method.fake_score")
        self.config, self.recipe, self.real = config, recipe, real
        self.network: Any = copy.deepcopy(model).train()
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        train = recipe.train
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=config.lr or train.lr, betas=train.betas, weight_decay=train.weight_decay
        )
        self.skipped = 0

    def update(
        self, generator: VelocityModel, cond: Condition, sample_shape: torch.Size, autocast: Any = None
    ) -> dict[str, Tensor]:
        """``fake_score.updates`` AdamW steps of the fake score on fresh detached one-step samples of ``generator``.

        An update whose loss or gradient is not finite is skipped (no step) and counted in ``skipped``.

        Args:
            generator: The student (its online weights).
            cond: Conditions of the batch (every update uses them, with fresh noise).
            sample_shape: Shape ``[B, ...]`` of the samples.
            autocast: Context around the forward passes (bf16 autocast or None).

        Returns:
            ``{"fake_score": mean loss over the updates, "fake_score_grad_norm": mean grad norm}``, detached.
        """
        method = self.recipe.method
        losses, norms = [], []
        for _ in range(self.config.updates):
            with autocast or contextlib.nullcontext():
                with torch.no_grad():
                    x_generated = one_step(generator, torch.randn(sample_shape, device=_device(cond)), cond)
                loss = fake_score_loss(self.network, x_generated, cond, method.time_dist, method.loss, method.barron_c)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.recipe.train.grad_clip)
            if bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):  # one host sync an update
                self.optimizer.step()
            else:
                self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            norms.append(norm.detach().float())
        return {"fake_score": torch.stack(losses).mean(), "fake_score_grad_norm": torch.stack(norms).mean()}

    def loss(
        self,
        models: ObjectiveModels,
        x_data: Tensor,
        cond: Condition,
        uncond: Condition,
        settings: ObjectiveSettings,
    ) -> LossOutput:
        """The generator's loss (:func:`apex_cli.core.dmd.dmd_loss`) against this fake score and the teacher."""
        with _eval(self.network):
            return dmd_loss(models, self.network, self.real, x_data, cond, uncond, settings, self.config.real_guidance)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides the weights: the optimizer state and the skipped-update count."""
        return {"optimizer": self.optimizer.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped = state["skipped"]


def _device(cond: Condition) -> torch.device:
    return next(iter(cond.values())).device


@contextlib.contextmanager
def _eval(module: nn.Module) -> Any:
    """The fake score in eval mode while it gives the generator its direction (no dropout in a target)."""
    module.eval()
    try:
        yield
    finally:
        module.train()
