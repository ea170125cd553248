"""What every apex model with peft LoRA adapters shares: which tensors train, and how they are saved and loaded.

Both the shapes UNet (``models/shapes.py``) and the diffusers generators (``models/diffusers_base.py``) inject the
adapters with diffusers' ``add_adapter`` and then call :meth:`AdapterState._mark_trainable`; from then on a
checkpoint holds only the tensors that train (the adapters and the E4a target-time embedder), under the same keys on
the online model and on any copy of it (an EMA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from apex_cli.errors import CheckpointError


class AdapterState:
    """Mixin for an ``nn.Module`` that may carry LoRA adapters on its ``adapted`` submodule.

    ``_lora_keys`` is None for a model without adapters (everything trains and is saved), else the state-dict keys of
    the parameters that require grad right after the adapters were added.
    """

    _lora_keys: tuple[str, ...] | None = None
    ADAPTED_MODULE: str = ""
    """Attribute name of the submodule that holds the adapters (``unet``, ``transformer``)."""

    @property
    def has_lora(self) -> bool:
        """Whether adapters have been added (``add_lora``)."""
        return self._lora_keys is not None

    def _mark_trainable(self) -> None:
        """Remember the keys that train now (call right after adding the adapters and unfreezing ``Emb2``)."""
        assert isinstance(self, nn.Module)
        self._lora_keys = tuple(name for name, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint of this model must hold: with adapters only the adapters and the target-time embedder
        (the keys that train, also on a frozen copy such as an EMA); else the whole state dict."""
        assert isinstance(self, nn.Module)
        state = self.state_dict()
        return state if self._lora_keys is None else {key: state[key] for key in self._lora_keys}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` returned, strictly on its keys and shapes.

        Raises:
            CheckpointError: A key is missing or unexpected, or a shape differs.
        """
        assert isinstance(self, nn.Module)
        expected = self.trainable_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"the weights do not fit this model: {len(missing)} missing (e.g. {missing[:1]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
            )
        wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise CheckpointError(
                f"the weights do not fit this model: {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                f"expected {tuple(expected[wrong[0]].shape)}"
            )
        self.load_state_dict(state, strict=False)

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights (``W <- W + (alpha / rank) B A``), drop them, unfreeze the base."""
        if not self.has_lora:
            raise ValueError("the model has no LoRA adapters to merge")
        adapted = getattr(self, self.ADAPTED_MODULE)
        adapted.fuse_lora()
        adapted.unload_lora()
        adapted.requires_grad_(True)
        self._lora_keys = None

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Within the context the adapted module is the frozen base (adapters off): the ``frozen`` reference of E7.

        It costs no memory: peft skips the adapters' branch, the base weights are the ones already in place.
        """
        if not self.has_lora:
            raise ValueError("the model has no LoRA adapters to disable")
        adapted = getattr(self, self.ADAPTED_MODULE)
        adapted.disable_adapters()
        try:
            yield
        finally:
            adapted.enable_adapters()
