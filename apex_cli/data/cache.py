"""On-disk cache of text conditions and VAE latents, so a 20B run encodes each prompt and image once, ever.

Layout under the cache folder (recipe ``data.cache_dir``)::

    <model key>/text/<sha256 of (prompt, unconditional)>.safetensors     one condition (its named tensors)
    <model key>/latents/<image_size>/<sha256 of the image file's path, size and mtime>.safetensors

The model key (:func:`model_key`) is the model name with a hash of everything the encodings depend on: the pipeline
(name, path, revision, seed of a tiny one), the weights' dtype, the token count and the unconditional prompt. Two
recipes that agree on those share entries; changing any of them starts a new folder. An image that changes on disk
(new size or mtime) gets a new key.

Conditions with a token mask whose ones form a prefix (Qwen-Image, SANA) are stored cut to that prefix and padded
back on load (a Qwen-Image prompt is about 50 of its 512 tokens); the others (SD3, FLUX: T5's padding tokens are
attended to) are stored whole. Every file is written to a temporary name and renamed, so a killed run never leaves
half a file, and several processes may fill the same cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CACHE_FORMAT = 1
_TOKEN_AXIS = ("embeds", "mask")
"""Condition tensors whose axis 0 is the token axis (cut and padded back)."""


def model_key(model_config: Any, max_sequence_length: int, unconditional_prompt: str) -> str:
    """``<name>-<16 hex digits>``: the cache folder of a diffusers model section, resolved token count and ``e``."""
    identity = {
        "format": CACHE_FORMAT,
        "name": model_config.name,
        "path": model_config.path,
        "revision": model_config.revision,
        "seed": model_config.seed if model_config.path is None else None,
        "dtype": model_config.dtype,
        "max_sequence_length": max_sequence_length,
        "unconditional_prompt": unconditional_prompt,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_config.name.replace('/', '_')}-{digest}"


class DiskCache:
    """Conditions and latents of one model on disk; see the module docstring for the layout.

    Args:
        root: The cache folder (``data.cache_dir``).
        key: :func:`model_key` of the model.
    """

    def __init__(self, root: str | Path, key: str) -> None:
        self.folder = Path(root) / key
        self.reads = 0
        self.writes = 0

    # --- text conditions ---

    def text_path(self, prompt: str, unconditional: bool) -> Path:
        """Where the condition of ``prompt`` lives."""
        digest = hashlib.sha256(json.dumps([prompt, unconditional]).encode()).hexdigest()
        return self.folder / "text" / f"{digest}.safetensors"

    def get_text(self, prompt: str, unconditional: bool) -> dict[str, Tensor] | None:
        """The cached condition of ``prompt`` (rows without the batch axis), or None."""
        path = self.text_path(prompt, unconditional)
        if not path.is_file():
            return None
        stored = load_file(str(path))
        self.reads += 1
        length = int(stored.pop("__length__", torch.tensor(-1)))
        if length < 0:
            return stored
        return {key: _pad(value, length) if key in _TOKEN_AXIS else value for key, value in stored.items()}

    def put_text(self, prompt: str, unconditional: bool, condition: dict[str, Tensor]) -> None:
        """Store one condition (rows without the batch axis), cut to its mask's prefix of ones when it has one."""
        tensors = {key: value.detach().cpu().contiguous() for key, value in condition.items()}
        mask = tensors.get("mask")
        if mask is not None and mask.ndim == 1:
            kept = int(mask.sum())
            if bool(mask[:kept].all()) and not bool(mask[kept:].any()):
                length = mask.shape[0]
                tensors = {
                    key: value[:kept].contiguous() if key in _TOKEN_AXIS else value for key, value in tensors.items()
                }
                tensors["__length__"] = torch.tensor(length)
        _atomic_save(tensors, self.text_path(prompt, unconditional))
        self.writes += 1

    # --- latents ---

    def latent_path(self, image: Path, image_size: int) -> Path:
        """Where the latent of ``image`` at ``image_size`` pixels lives (keyed by path, size and mtime)."""
        stat = image.stat()
        identity = json.dumps([str(image.resolve()), stat.st_size, stat.st_mtime_ns])
        digest = hashlib.sha256(identity.encode()).hexdigest()
        return self.folder / "latents" / str(image_size) / f"{digest}.safetensors"

    def get_latent(self, image: Path, image_size: int) -> Tensor | None:
        """The cached latent ``[C, h, w]`` of ``image``, or None."""
        path = self.latent_path(image, image_size)
        if not path.is_file():
            return None
        self.reads += 1
        return load_file(str(path))["latent"]

    def put_latent(self, image: Path, image_size: int, latent: Tensor) -> None:
        """Store the latent ``[C, h, w]`` of ``image``."""
        _atomic_save({"latent": latent.detach().cpu().contiguous()}, self.latent_path(image, image_size))
        self.writes += 1


def _pad(value: Tensor, length: int) -> Tensor:
    """Right-pad the token axis (axis 0) with zeros to ``length`` (the padding ``pad_tokens`` writes)."""
    if value.shape[0] >= length:
        return value
    return torch.cat([value, value.new_zeros(length - value.shape[0], *value.shape[1:])])


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
