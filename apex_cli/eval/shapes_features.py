"""Feature network for FID on the shapes world, trained on the renderer's scene labels.

Inception features mean little on 32x32 flat-coloured shapes and need a download, so the shapes world has a feature
extractor of its own. ``ShapesFeatureNet`` maps float ``[0, 255]`` RGB images ``[N, 3, 32, 32]`` to 128-d
features (the same input convention as clean-fid's Inception, so clean-fid's pipeline drives it). It is trained as
the trunk of a multi-task classifier on labels read from the scenes of ``apex_cli.data.shapes.sample_scene``:

* how many of each shape (0 to 4, one 5-way softmax per shape);
* which colours are present (multi-label, one per palette colour);
* which (shape, colour) pairs are present (multi-label);
* which cells of a 4x4 grid hold an object centre (multi-label), so the features see layout too.

The features are the pre-activation output of the 128-unit layer the heads read from, shifted and scaled (one
scalar) so that on clean renders they have mean 0 and mean variance 1, the order of magnitude KID's kernel expects.
The heads are dropped from the shipped file. Training sees only clean renders (no blur or noise augmentation), so
blurred images land away from the clean feature distribution: at 1,000 vs 1,000 images, FID is 3.1 against renders of
another seed and 13.6 against the same renders with a Gaussian blur of radius 1 (``bench/fid_sanity.py``). A blur of
radius 0.5 is not detected (3.3): the labels do not depend on edge sharpness.

The shipped weights ``apex_cli/eval/weights/shapes_features.safetensors`` (1.41 MB) were built with this command,
seed 0, in 161 s on 1 CPU thread (torch 2.14.1):

    python -m apex_cli.eval.shapes_features --seed 0 --steps 2000 \\
        --out apex_cli/eval/weights/shapes_features.safetensors

Held-out (1,024 scenes of seed 1): all three shape counts right on 100.0% of scenes, all 48 binary labels right on
97.3%. The file's safetensors metadata records the seed, steps, batch size, torch version and these accuracies.
A change of the weights changes their hash, which is part of every FID reference cache key, so stale statistics are
never reused.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

IMAGE_SIZE_PX = 32
FEATURE_DIM = 128
MAX_COUNT = 4
GRID_CELLS = 4


class ShapesFeatureNet(nn.Module):
    """Six 3x3 convolutions (three with stride 2), 2x2 average pooling, then a linear layer to 128 features."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        widths = (32, 64, 128)
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.features = nn.Linear(channels * 2 * 2, feature_dim)
        # He initialisation: with PyTorch's default init the colour labels barely move in the first few hundred steps.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

        # Set after training (``calibrate``) so features of clean renders have mean 0 and mean variance 1.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the 128-unit layer the training heads read, before standardisation."""
        hidden = self.trunk(images / 127.5 - 1.0)
        return self.features(F.adaptive_avg_pool2d(hidden, 2).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, 128]`` of float ``[0, 255]`` images ``[N, 3, 32, 32]``: ``(raw - mean) / scale``."""
        return (self.raw_features(images) - self.feature_mean) / self.feature_scale

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Set ``feature_mean`` to the mean raw feature of ``images`` and ``feature_scale`` to the root of the mean
        per-dimension variance (one scalar, so the relative weight of the dimensions in FID is unchanged).

        KID's kernel ``(x.y / D + 1)^3`` assumes features of order one, as Inception's are; raw features are not.
        """
        raw = self.raw_features(images).double()
        self.feature_mean.copy_(raw.mean(0))
        self.feature_scale.copy_(raw.var(0).mean().sqrt())


def load_feature_net(path: Path) -> ShapesFeatureNet:
    """``ShapesFeatureNet`` with the weights of a safetensors file written by ``main``, in eval mode."""
    net = ShapesFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------
# Training


def scene_labels(scene: object) -> tuple[np.ndarray, np.ndarray]:
    """Labels of one scene: shape counts ``[len(SHAPES)]`` (int) and binary targets ``[n_binary]`` (float).

    The binary targets are, in order: colour present (8), (shape, colour) present (24), object centre in each cell of
    a 4x4 grid (16).
    """
    from apex_cli.data.shapes import PALETTE, SHAPES

    colours = list(PALETTE)
    counts = np.zeros(len(SHAPES), dtype=np.int64)
    colour_present = np.zeros(len(colours), dtype=np.float32)
    pair_present = np.zeros((len(SHAPES), len(colours)), dtype=np.float32)
    occupied = np.zeros((GRID_CELLS, GRID_CELLS), dtype=np.float32)
    cell_px = IMAGE_SIZE_PX / GRID_CELLS
    for obj in scene.objects:  # type: ignore[attr-defined]
        shape_index, colour_index = SHAPES.index(obj.shape), colours.index(obj.color)
        counts[shape_index] = min(counts[shape_index] + 1, MAX_COUNT)
        colour_present[colour_index] = 1.0
        pair_present[shape_index, colour_index] = 1.0
        occupied[min(int(obj.cy // cell_px), GRID_CELLS - 1), min(int(obj.cx // cell_px), GRID_CELLS - 1)] = 1.0
    return counts, np.concatenate([colour_present, pair_present.ravel(), occupied.ravel()])


def sample_batch(rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rendered scenes as float ``[0, 255]`` ``[B, 3, 32, 32]``, shape counts ``[B, 3]`` and binary labels."""
    from apex_cli.data.shapes import render, sample_scene

    images, counts, binary = [], [], []
    for _ in range(batch_size):
        scene = sample_scene(rng, None, IMAGE_SIZE_PX)
        images.append(render(scene, IMAGE_SIZE_PX))
        scene_counts, scene_binary = scene_labels(scene)
        counts.append(scene_counts)
        binary.append(scene_binary)
    images_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return images_t, torch.from_numpy(np.stack(counts)), torch.from_numpy(np.stack(binary))


class _LabelHeads(nn.Module):
    """Training-only heads on ReLU(features): count logits ``[B, n_shapes, 5]`` and binary logits."""

    def __init__(self, n_shapes: int, n_binary: int) -> None:
        super().__init__()
        self.n_shapes = n_shapes
        self.linear = nn.Linear(FEATURE_DIM, n_shapes * (MAX_COUNT + 1) + n_binary)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.linear(F.relu(features))
        split = self.n_shapes * (MAX_COUNT + 1)
        return logits[:, :split].view(-1, self.n_shapes, MAX_COUNT + 1), logits[:, split:]


def _loss(
    net: ShapesFeatureNet, heads: _LabelHeads, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, counts, binary = batch
    count_logits, binary_logits = heads(net.raw_features(images))
    # Summed over the labels of a scene, averaged over scenes: each label gets the same weight.
    count_loss = F.cross_entropy(count_logits.flatten(0, 1), counts.flatten(), reduction="none").view(counts.shape)
    binary_loss = F.binary_cross_entropy_with_logits(binary_logits, binary, reduction="none")
    loss = count_loss.sum(1).mean() + binary_loss.sum(1).mean()
    return loss, count_logits, binary_logits


def train_feature_net(
    seed: int, steps: int, batch_size: int = 64, lr: float = 2e-3, log_every: int = 100
) -> tuple[ShapesFeatureNet, dict[str, float]]:
    """Train ``ShapesFeatureNet`` on freshly rendered scenes; AdamW with a cosine learning-rate decay.

    Args:
        seed: Seeds the weight initialisation and the scene stream (held-out scenes use ``seed + 1``).
        steps: Optimizer steps.
        batch_size: Scenes per step.
        lr: Peak learning rate.
        log_every: Print the loss every this many steps.

    Returns:
        The network in eval mode, calibrated (``ShapesFeatureNet.calibrate``) on 4,096 scenes of ``seed + 2``, and
        held-out metrics on 1,024 scenes of ``seed + 1``: ``val_loss``, ``val_count_accuracy`` (all three counts
        right) and ``val_binary_accuracy`` (all 48 binary labels right).
    """
    from apex_cli.data.shapes import SHAPES

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ShapesFeatureNet()
    n_binary = scene_labels_size()
    heads = _LabelHeads(len(SHAPES), n_binary)
    params = [*net.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss, _, _ = _loss(net, heads, sample_batch(rng, batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)

    net.eval()
    with torch.no_grad():
        images, counts, binary = sample_batch(np.random.default_rng(seed + 1), 1024)
        val_loss, count_logits, binary_logits = _loss(net, heads, (images, counts, binary))
    metrics = {
        "val_loss": float(val_loss),
        "val_count_accuracy": float((count_logits.argmax(-1) == counts).all(dim=1).float().mean()),
        "val_binary_accuracy": float(((binary_logits > 0) == (binary > 0.5)).all(dim=1).float().mean()),
    }
    net.calibrate(sample_batch(np.random.default_rng(seed + 2), 4096)[0])
    return net, metrics


def scene_labels_size() -> int:
    """Number of binary labels per scene (colours + shape-colour pairs + grid cells)."""
    from apex_cli.data.shapes import PALETTE, SHAPES

    return len(PALETTE) + len(SHAPES) * len(PALETTE) + GRID_CELLS * GRID_CELLS


def main(argv: list[str] | None = None) -> None:
    """Train the shapes feature network and write its weights (features only, no heads) as safetensors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Output .safetensors file.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives the shipped file).")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    net, metrics = train_feature_net(args.seed, args.steps, args.batch_size, args.lr)
    metadata = {
        "seed": str(args.seed),
        "steps": str(args.steps),
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "torch": torch.__version__,
        **{key: f"{value:.4f}" for key, value in metrics.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({name: tensor.contiguous() for name, tensor in net.state_dict().items()}, tmp_name, metadata)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, args.out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )


if __name__ == "__main__":
    main()
