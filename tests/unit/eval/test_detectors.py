"""Detectors: the exact shapes detector against the renderer, and the official mmdet backend's wiring."""

import importlib.util

import numpy as np
import pytest

from apex_cli.data import shapes
from apex_cli.data.shapes import PALETTE
from apex_cli.errors import ApexError
from apex_cli.eval import detectors
from apex_cli.eval.detectors import GENEVAL_COLORS, Detection, Detector, MMDetDetector, ShapesDetector


def _canvas(size: int = 32) -> np.ndarray:
    return np.zeros((size, size, 3), dtype=np.uint8)


def _paint(image: np.ndarray, shape: str, x0: int, y0: int, side: int, rgb) -> None:
    image[y0 : y0 + side, x0 : x0 + side][shapes.shape_mask(shape, side, side)] = rgb


def _all(found: dict[str, list[Detection]]) -> list[Detection]:
    return [d for dets in found.values() for d in dets]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_detector_recovers_every_rendered_object(size):
    """Quick version of bench/geneval_detector.py: shape, colour and box of every object (200 images at 32)."""
    detector = ShapesDetector()
    assert isinstance(detector, Detector)
    rng = np.random.default_rng(2024)
    n_images = 200 if size == 32 else 40
    objects = shape_ok = colour_ok = 0
    for _ in range(n_images):
        scene = shapes.sample_scene(rng, None, size)
        found = _all(detector.detect(shapes.render(scene, size)))
        assert len(found) == len(scene.objects)
        for obj in scene.objects:
            objects += 1
            match = [d for d in found if d.box == obj.box]
            shape_ok += bool(match) and match[0].class_name == obj.shape
            colour_ok += bool(match) and match[0].color == obj.color
            assert match and match[0].score == pytest.approx(1.0)
    assert shape_ok / objects >= 0.995 and colour_ok / objects >= 0.995


def test_detections_are_grouped_by_class_and_sorted():
    image = _canvas()
    _paint(image, "circle", 1, 1, 10, PALETTE["red"])
    _paint(image, "circle", 18, 1, 10, (230, 20, 20))  # off-palette: lower score
    _paint(image, "square", 1, 18, 9, PALETTE["blue"])
    found = ShapesDetector().detect(image)
    assert set(found) == {"circle", "square"}
    circles = found["circle"]
    assert [d.box for d in circles] == [(1.0, 1.0, 11.0, 11.0), (18.0, 1.0, 28.0, 11.0)]
    assert circles[0].score == 1.0 > circles[1].score > 0.5
    assert circles[1].color == "red"


def test_touching_objects_of_different_colours_come_apart():
    image = _canvas()
    _paint(image, "square", 4, 10, 10, PALETTE["red"])
    _paint(image, "square", 14, 10, 10, PALETTE["green"])  # shares an edge with the red square
    found = ShapesDetector().detect(image)["square"]
    assert sorted((d.color, d.box) for d in found) == [
        ("green", (14.0, 10.0, 24.0, 20.0)),
        ("red", (4.0, 10.0, 14.0, 20.0)),
    ]


def test_size_and_aspect_filter_ignore_implausible_blobs():
    image = _canvas()
    _paint(image, "square", 1, 1, 3, PALETTE["white"])  # speck
    image[20:30, 2:30] = PALETTE["yellow"]  # long bar (two touching same-colour squares look like this)
    assert ShapesDetector().detect(image) == {}
    big = _canvas()
    big[1:31, 1:31] = PALETTE["cyan"]  # bigger than any object
    assert ShapesDetector().detect(big) == {}


def test_score_reflects_shape_and_colour_quality():
    detector = ShapesDetector()
    ring = _canvas()
    _paint(ring, "square", 10, 10, 12, PALETTE["white"])
    ring[13:19, 13:19] = 0  # a hollow square is filled before matching: still a square
    assert detector.detect(ring)["square"][0].score == 1.0
    plus = _canvas()
    plus[10:22, 14:18] = PALETTE["white"]
    plus[14:18, 10:22] = PALETTE["white"]
    (det,) = _all(detector.detect(plus))
    assert 0.3 < det.score < 0.9  # found, but not confident enough for the counting task
    between = _canvas()
    _paint(between, "square", 10, 10, 10, (255, 64, 0))  # halfway between red and orange
    (det,) = _all(detector.detect(between))
    assert det.score < 0.1


def test_blank_and_noise_images_give_nothing():
    detector = ShapesDetector()
    assert detector.detect(_canvas()) == {}
    rng = np.random.default_rng(5)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(30)]
    assert sum(len(_all(detector.detect(im))) for im in noise) <= 1


# ----------------------------------------------------------------------------------------------------------------
# MMDet (official) backend, through a fake


class FakeBackend:
    """Stands in for Mask2Former + CLIP: fixed per-class arrays and colour logits, with call records."""

    classnames = ("person", "cup", "dog")

    def __init__(self, bboxes, segms=None, favourite=None):
        self.bboxes, self.segms, self.favourite = bboxes, segms, favourite or {}
        self.colour_calls = []

    def detect(self, image):
        return self.bboxes, self.segms

    def color_logits(self, image, boxes, masks, classname):
        self.colour_calls.append((classname, boxes.copy(), None if masks is None else masks.copy()))
        logits = np.zeros((len(boxes), len(GENEVAL_COLORS)))
        for i, box in enumerate(boxes):
            logits[i, GENEVAL_COLORS.index(self.favourite.get(round(float(box[4]), 3), "black"))] = 5.0
        return logits


def test_mmdet_detector_applies_official_selection_and_colours():
    person = np.array([[0, 0, 10, 10, 0.5], [5, 5, 20, 20, 0.95], [1, 1, 2, 2, 0.3], [3, 3, 9, 9, 0.31]], np.float32)
    cup = np.array([[0, 0, 4, 4, 0.2]], np.float32)
    dog = np.array([[i, i, i + 5, i + 5, 0.4 + i / 100] for i in range(20)], np.float32)
    masks = [np.zeros((len(a), 24, 24), bool) for a in (person, cup, dog)]
    masks[0][1, 5:20, 5:20] = True
    backend = FakeBackend([person, cup, dog], masks, favourite={0.95: "red", 0.5: "blue"})
    found = MMDetDetector(backend=backend).detect(np.zeros((24, 24, 3), np.uint8))
    assert set(found) == {"person", "dog"}  # cup below the threshold: no entry
    assert [d.score for d in found["person"]] == pytest.approx([0.95, 0.5, 0.31])  # 0.3 itself is not > 0.3
    assert [d.color for d in found["person"]] == ["red", "blue", "black"]
    assert found["person"][0].box == (5.0, 5.0, 20.0, 20.0) and found["person"][0].class_name == "person"
    assert len(found["dog"]) == 16 and found["dog"][0].score == pytest.approx(0.59)
    assert found["dog"][-1].score == pytest.approx(0.44)
    # CLIP sees only the kept objects, with their own masks, in score order.
    name, boxes, kept_masks = backend.colour_calls[0]
    assert name == "person" and boxes[:, 4].tolist() == pytest.approx([0.95, 0.5, 0.31])
    assert kept_masks[0].sum() == 225 and kept_masks[1].sum() == 0


def test_mmdet_detector_rejects_malformed_logits():
    class Bad(FakeBackend):
        def color_logits(self, image, boxes, masks, classname):
            return np.zeros((len(boxes), 3))

    backend = Bad([np.array([[0, 0, 1, 1, 0.9]]), np.zeros((0, 5)), np.zeros((0, 5))])
    with pytest.raises(ValueError, match="logits"):
        MMDetDetector(backend=backend).detect(np.zeros((4, 4, 3), np.uint8))


def _hide_packages(monkeypatch):
    real = importlib.util.find_spec
    hidden = {"mmcv", "mmdet", "open_clip"}
    monkeypatch.setattr(
        detectors.importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )


def test_mmdet_missing_packages_and_weights_say_what_to_do(tmp_path, monkeypatch):
    _hide_packages(monkeypatch)
    with pytest.raises(ApexError) as err:
        MMDetDetector(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for needed in ("pip install", "mmdet", "open_clip", str(tmp_path), "ViT-L-14.pt"):
        assert needed in message
    assert "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth" in message


def test_mmdet_missing_weights_only(tmp_path, monkeypatch):
    monkeypatch.setattr(detectors.importlib.util, "find_spec", lambda name, *a: object())
    (tmp_path / "ViT-L-14.pt").write_bytes(b"")
    with pytest.raises(ApexError) as err:
        MMDetDetector(tmp_path)
    message = str(err.value)
    assert "pip install" not in message and "\n" not in message
    assert f"missing {detectors.MASK2FORMER_NAME}.pth in {tmp_path}" in message


def test_mmdet_missing_packages_only(tmp_path, monkeypatch):
    _hide_packages(monkeypatch)
    (tmp_path / f"{detectors.MASK2FORMER_NAME}.pth").write_bytes(b"")
    (tmp_path / "ViT-L-14.pt").write_bytes(b"")
    with pytest.raises(ApexError, match=r"missing Python packages mmcv, mmdet, open_clip: pip install") as err:
        MMDetDetector(tmp_path)
    assert "missing mask2former" not in str(err.value)
