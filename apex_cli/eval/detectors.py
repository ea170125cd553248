"""Object detectors for GenEval: an exact one for the shapes world, and the official Mask2Former + CLIP backend.

A detector maps an RGB image to detections grouped by class name, each list sorted by decreasing score. Score
thresholds (0.3, 0.9 for counting) and the 16-a-class cap are applied by ``apex_cli.eval.geneval``, as in the
official ``evaluate_image``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from apex_cli.data.shapes import OBJECT_SIZE_RANGE_32, PALETTE, SHAPES, shape_mask
from apex_cli.errors import ApexError

GENEVAL_COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
"""The colour classes of GenEval's CLIP colour classifier, in the official order."""


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels (continuous coordinates, ``x2, y2`` exclusive), as mmdet reports boxes.
        score: Confidence in ``[0, 1]``.
        color: Colour name, or ``None`` when the detector does not classify colour.
        class_name: The object class (a shape name, or a COCO class for the official detector).
    """

    box: tuple[float, float, float, float]
    score: float
    color: str | None
    class_name: str


@runtime_checkable
class Detector(Protocol):
    """Anything that finds objects in an image.

    Attributes:
        colors: The colour names ``Detection.color`` can take, in the order GenEval lists them in a reason string.
    """

    colors: tuple[str, ...]

    def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
        """Detections of an ``(H, W, 3)`` uint8 image by class, each list sorted by decreasing score."""
        ...


def _by_class(detections: list[Detection]) -> dict[str, list[Detection]]:
    grouped: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        grouped.setdefault(det.class_name, []).append(det)
    return grouped


# ----------------------------------------------------------------------------------------------------------------
# Shapes


class ShapesDetector:
    """Exact, offline detector of the shapes world (apex_cli.data.shapes).

    1. Every pixel gets the nearest of the palette colours and black; non-black pixels form 4-connected components
       (``scipy.ndimage.label``). A component whose pixels are not at least ``dominant_share`` one colour is split
       into its single-colour components, so touching objects of different colours come apart.
    2. Size filter: a blob's bounding box sides must lie in ``[0.6 lo, 1.5 hi]`` (``lo..hi`` = 8..12 px at 32x32,
       scaled with the image) and its aspect ratio be at most ``max_aspect``; anything else (noise specks, merged
       blobs, the whole canvas) is ignored.
    3. Shape: the holes-filled blob mask ``M`` is compared with each shape's template ``T_s`` drawn into the same
       box (``shape_mask``); the class is ``argmax_s IoU(M, T_s)``.
    4. Colour: the mean RGB ``m`` of the blob's pixels; ``color`` is the nearest palette colour ``p``.
    5. Score ``= IoU(M, T_best) * max(0, 1 - (|m - p| / R)^2)`` with ``R`` = 63.5, half the smallest distance
       between two palette colours (or black): exactly 1 for the renderer's own objects, lower as the blob departs
       from an ideal shape or colour, 0 for a colour halfway between two palette colours. GenEval's 0.3 threshold
       then asks for a recognisable shape and colour; the counting task's 0.9 for a near-exact one.

    Args:
        dominant_share: Share of one colour above which a component counts as one object.
        max_aspect: Largest accepted ``max(w, h) / min(w, h)`` of a blob's box.
    """

    colors: tuple[str, ...] = tuple(PALETTE)

    def __init__(self, dominant_share: float = 0.75, max_aspect: float = 1.5) -> None:
        self.dominant_share = dominant_share
        self.max_aspect = max_aspect
        # Palette index 0 is black (the background); 1.. are the object colours.
        self._centres = np.array([(0, 0, 0), *PALETTE.values()], dtype=np.float64)
        pairwise = np.linalg.norm(self._centres[:, None] - self._centres[None], axis=-1)
        self._radius = float(pairwise[np.triu_indices(len(self._centres), 1)].min()) / 2
        self._templates: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
        """Detections of an ``(H, W, 3)`` uint8 image by shape name, each list sorted by decreasing score."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        pixels = image.astype(np.float64)
        distances = np.linalg.norm(pixels[:, :, None, :] - self._centres[None, None], axis=-1)
        nearest = distances.argmin(-1)
        side = min(image.shape[:2])
        lo, hi = (s * side / 32 for s in OBJECT_SIZE_RANGE_32)
        min_side, max_side = 0.6 * lo, 1.5 * hi

        detections: list[Detection] = []
        components, _ = ndimage.label(nearest > 0)
        for index, where in enumerate(ndimage.find_objects(components), start=1):
            blob = components[where] == index
            colours = nearest[where][blob]
            shares = np.bincount(colours, minlength=len(self._centres)) / colours.size
            if shares.max() >= self.dominant_share:
                parts = [blob]
            else:
                parts = []
                for colour in np.flatnonzero(shares):
                    sub, m = ndimage.label(blob & (nearest[where] == colour))
                    parts.extend(sub == k for k in range(1, m + 1))
            for part in parts:
                rows = np.flatnonzero(part.any(1))
                cols = np.flatnonzero(part.any(0))
                h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
                if not (min_side <= min(h, w) and max(h, w) <= max_side and max(h, w) / min(h, w) <= self.max_aspect):
                    continue
                y0, x0 = where[0].start + rows[0], where[1].start + cols[0]
                mask = part[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
                mean = pixels[y0 : y0 + h, x0 : x0 + w][mask].mean(0)
                detections.append(self._describe(mask, mean, x0, y0))
        return _by_class(detections)

    def _describe(self, mask: np.ndarray, mean: np.ndarray, x0: int, y0: int) -> Detection:
        h, w = mask.shape
        filled = ndimage.binary_fill_holes(mask)
        templates = self._templates.get((w, h))
        if templates is None:
            templates = self._templates[(w, h)] = {s: shape_mask(s, w, h) for s in SHAPES}
        ious = {s: float((filled & t).sum() / (filled | t).sum()) for s, t in templates.items()}
        shape = max(ious, key=ious.__getitem__)
        colour_dist = np.linalg.norm(self._centres[1:] - mean, axis=-1)
        colour = int(colour_dist.argmin())
        colour_score = max(0.0, 1.0 - (float(colour_dist[colour]) / self._radius) ** 2)
        return Detection(
            box=(float(x0), float(y0), float(x0 + w), float(y0 + h)),
            score=ious[shape] * colour_score,
            color=self.colors[colour],
            class_name=shape,
        )


# ----------------------------------------------------------------------------------------------------------------
# Official GenEval backend

MASK2FORMER_NAME = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
"""The official detector: weights ``<weights_dir>/<name>.pth``, config ``<name>.py`` (evaluate_images.py)."""
MASK2FORMER_URL = (
    "https://download.openmmlab.com/mmdetection/v3.0/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/"
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth"
)
CLIP_ARCH = "ViT-L-14"
CLIP_FILE = "ViT-L-14.pt"
"""OpenAI's ViT-L/14 checkpoint, loaded from ``<weights_dir>/ViT-L-14.pt`` (GenEval uses ``pretrained="openai"``)."""
PIP_PACKAGES = "pip install 'mmdet==2.27.0' mmcv-full open_clip_torch (the official GenEval setup uses mim install)"


class MMDetBackend(Protocol):
    """What ``MMDetDetector`` needs from Mask2Former and CLIP; the real one is built from the weights directory.

    Attributes:
        classnames: The detector's class names in label order (the 80 COCO names of GenEval's object_names.txt).
    """

    classnames: Sequence[str]

    def detect(self, image: np.ndarray) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray] | None]:
        """mmdet 2.x ``inference_detector`` output: per class an ``(n, 5)`` array ``[x1, y1, x2, y2, score]``,
        and per class ``n`` masks of shape ``(H, W)`` (or ``None``)."""
        ...

    def color_logits(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, classname: str
    ) -> np.ndarray:
        """CLIP zero-shot logits ``(n, len(GENEVAL_COLORS))`` of the ``n`` objects' crops."""
        ...


class MMDetDetector:
    """GenEval's official detector: Mask2Former Swin-S (mmdet) for objects, CLIP ViT-L-14 for their colours.

    Per class, the boxes are sorted by decreasing score, those with score ``> threshold`` kept, at most
    ``max_objects`` of them (evaluate_images.py, NMS off as in its default ``max_overlap=1``); each kept object's
    colour is the argmax of the CLIP colour logits. ``threshold`` is the smallest threshold the protocol uses
    (0.3); geneval applies the counting threshold (0.9) on top, which keeps exactly the official selection.

    Nothing is downloaded: the weights must already be in ``weights_dir``.

    Args:
        weights_dir: Folder with ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` and ``ViT-L-14.pt``.
        config_path: The mmdet config; defaults to ``<weights_dir>/<name>.py``, else the copy inside the
            installed mmdet package (evaluate_images.py's default).
        device: Torch device, for example ``"cuda"``.
        threshold: Score threshold.
        max_objects: Cap on detections a class.
        backend: A ready backend (tests inject a fake one); when given, nothing is loaded.

    Raises:
        ApexError: A package or a weights file is missing; the message says what to install and where to put what.
    """

    colors: tuple[str, ...] = GENEVAL_COLORS

    def __init__(
        self,
        weights_dir: str | os.PathLike[str] | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        device: str = "cuda",
        threshold: float = 0.3,
        max_objects: int = 16,
        backend: MMDetBackend | None = None,
    ) -> None:
        self.threshold = threshold
        self.max_objects = max_objects
        if backend is None:
            if weights_dir is None:
                raise ApexError("the official GenEval detector needs a weights directory", hint=_weights_hint("<dir>"))
            backend = _OfficialBackend.load(Path(weights_dir), config_path, device)
        self.backend = backend

    def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
        """Detections of an ``(H, W, 3)`` uint8 image by COCO class, each sorted by decreasing score."""
        bboxes, segms = self.backend.detect(image)
        detected: dict[str, list[Detection]] = {}
        for index, classname in enumerate(self.backend.classnames):
            boxes = np.asarray(bboxes[index]).reshape(-1, 5)  # native dtype: the official > compares in it
            order = np.argsort(boxes[:, 4], kind="stable")[::-1]
            order = order[boxes[order, 4] > self.threshold][: self.max_objects]
            if order.size == 0:
                continue
            masks = None if segms is None else np.asarray(segms[index])[order]
            logits = np.asarray(self.backend.color_logits(image, boxes[order], masks, classname))
            if logits.shape != (order.size, len(GENEVAL_COLORS)):
                raise ValueError(
                    f"colour logits must have shape ({order.size}, {len(GENEVAL_COLORS)}), got {logits.shape}"
                )
            detected[classname] = [
                Detection(
                    box=tuple(float(v) for v in boxes[i, :4]),
                    score=float(boxes[i, 4]),
                    color=GENEVAL_COLORS[int(k)],
                    class_name=classname,
                )
                for i, k in zip(order, logits.argmax(1), strict=True)
            ]
        return detected


def _weights_hint(weights_dir: str) -> str:
    return (
        f"put {MASK2FORMER_NAME}.pth (from {MASK2FORMER_URL}, saved under that name, as GenEval's "
        f"download_models.sh does) and OpenAI's {CLIP_FILE} in {weights_dir}"
    )


class _OfficialBackend:
    """Mask2Former via mmdet 2.x and CLIP via open_clip, the way GenEval's evaluate_images.py uses them."""

    def __init__(self, detector: Any, clip: tuple[Any, Any, Any], classnames: Sequence[str], device: str) -> None:
        self._detector = detector
        self._clip_model, self._transform, self._tokenizer = clip
        self.classnames = classnames
        self._device = device
        self._classifiers: dict[str, Any] = {}

    @classmethod
    def load(cls, weights_dir: Path, config_path: str | os.PathLike[str] | None, device: str) -> _OfficialBackend:
        missing_packages = [m for m in ("torch", "mmcv", "mmdet", "open_clip") if importlib.util.find_spec(m) is None]
        missing_files = [f for f in (f"{MASK2FORMER_NAME}.pth", CLIP_FILE) if not (weights_dir / f).is_file()]
        problems = []
        if missing_packages:
            problems.append(f"missing Python packages {', '.join(missing_packages)}: {PIP_PACKAGES}")
        if missing_files:
            problems.append(f"missing {', '.join(missing_files)} in {weights_dir}: {_weights_hint(str(weights_dir))}")
        if problems:
            raise ApexError("official GenEval detector unavailable: " + "; ".join(problems))

        import mmdet
        import open_clip
        from mmdet.apis import init_detector

        if config_path is None:
            candidates = [weights_dir / f"{MASK2FORMER_NAME}.py"] + [
                Path(mmdet.__file__).parent / sub / "mask2former" / f"{MASK2FORMER_NAME}.py"
                for sub in ("../configs", ".mim/configs")
            ]
            config_path = next((c for c in candidates if c.is_file()), None)
            if config_path is None:
                raise ApexError(
                    f"mmdet config {MASK2FORMER_NAME}.py not found in {weights_dir} nor in the mmdet package",
                    hint="pass config_path=, or install mmdet with its configs (mim install mmdet==2.27.0)",
                )
        detector = init_detector(str(config_path), str(weights_dir / f"{MASK2FORMER_NAME}.pth"), device=device)
        clip_model = open_clip.load_openai_model(str(weights_dir / CLIP_FILE), device=device).eval()
        transform = open_clip.image_transform(clip_model.visual.image_size, is_train=False)
        tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        classnames = detector.CLASSES if hasattr(detector, "CLASSES") else detector.dataset_meta["classes"]
        return cls(detector, (clip_model, transform, tokenizer), list(classnames), device)

    def detect(self, image: np.ndarray) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray] | None]:
        from mmdet.apis import inference_detector

        result = inference_detector(self._detector, image[:, :, ::-1].copy())  # mmdet takes BGR arrays
        if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample -> the 2.x per-class lists
            inst = result.pred_instances.cpu().numpy()
            rows = np.concatenate([inst.bboxes, inst.scores[:, None]], axis=1)
            masks = getattr(inst, "masks", None)
            bbox = [rows[inst.labels == k] for k in range(len(self.classnames))]
            segm = None if masks is None else [masks[inst.labels == k] for k in range(len(self.classnames))]
            return bbox, segm
        bbox = result[0] if isinstance(result, tuple) else result
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        return bbox, segm

    def color_logits(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, classname: str
    ) -> np.ndarray:
        """CLIP logits as in evaluate_images.py: each object masked onto a #999 background, cropped to its box,
        scored against the mean of three prompt templates per colour."""
        import torch
        from PIL import Image

        model, device = self._clip_model, self._device
        if classname not in self._classifiers:
            templates = [
                f"a photo of a {{c}} {classname}",
                f"a photo of a {{c}}-colored {classname}",
                "a photo of a {c} object",
            ]
            weights = []
            with torch.no_grad():
                for colour in GENEVAL_COLORS:
                    emb = model.encode_text(self._tokenizer([t.format(c=colour) for t in templates]).to(device))
                    emb = emb / emb.norm(dim=-1, keepdim=True)
                    emb = emb.mean(0)
                    weights.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(weights, dim=1)
        picture = Image.fromarray(image).convert("RGB")
        blank = Image.new("RGB", picture.size, color="#999")
        crops = []
        for i, box in enumerate(boxes):
            crop = picture if masks is None else Image.composite(picture, blank, Image.fromarray(masks[i]))
            crops.append(self._transform(crop.crop(tuple(box[:4]))))
        with torch.no_grad():
            features = model.encode_image(torch.stack(crops).to(device))
            features = features / features.norm(dim=-1, keepdim=True)
            return (100.0 * features @ self._classifiers[classname]).float().cpu().numpy()
