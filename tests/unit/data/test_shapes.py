"""The shapes world: renderer geometry and determinism, the GenEval prompt grammar, suites and suite files."""

import collections
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from apex_cli.data import shapes
from apex_cli.data.shapes import PALETTE, SHAPES, TASKS, Scene, ShapeObject
from apex_cli.errors import DataError
from apex_cli.eval.geneval import relative_position

OFFICIAL = Path("/work/shared/data/geneval/evaluation_metadata.jsonl")
needs_official = pytest.mark.skipif(not OFFICIAL.is_file(), reason="official GenEval metadata not available")


def _scenes(seed: int, n: int, tag: str | None = None, size: int = 32) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, tag, size) for _ in range(n)]


def test_palette_colours_are_well_separated():
    colours = np.array([(0, 0, 0), *PALETTE.values()], dtype=float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)[np.triu_indices(len(colours), 1)]
    assert len(PALETTE) == 8
    assert set(PALETTE) == {"red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"}
    assert distances.min() >= 120


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [8, 9, 12, 16, 24])
def test_shape_masks_fill_their_box_with_the_expected_area(shape, side):
    mask = shapes.shape_mask(shape, side, side)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
    assert abs(mask.mean() - expected) < 0.13


def test_render_is_deterministic_for_a_seed():
    first = [shapes.render(s) for s in _scenes(7, 50)]
    again = [shapes.render(s) for s in _scenes(7, 50)]
    other = [shapes.render(s) for s in _scenes(8, 50)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    prompts_a = [p for p, _ in itertools.islice(shapes.training_stream(3), 30)]
    prompts_b = [p for p, _ in itertools.islice(shapes.training_stream(3), 30)]
    assert prompts_a == prompts_b


@pytest.mark.parametrize("size", [32, 64])
def test_scenes_have_1_to_4_separated_objects_of_the_right_size(size):
    lo, hi = shapes.object_size_range(size)
    assert (lo, hi) == ((8, 12) if size == 32 else (16, 24))
    for scene in _scenes(1, 300, size=size):
        image = shapes.render(scene, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert lo <= obj.size <= hi
            x1, y1, x2, y2 = obj.box
            assert min(x1, y1) >= 0 and max(x2, y2) <= size
            assert (image[int(y1) : int(y2), int(x1) : int(x2)] == PALETTE[obj.color]).all(-1).any()
        for a, b in itertools.combinations(scene.objects, 2):
            gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
            gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gap_x, gap_y) >= 2
        # Only palette colours and black, and every coloured pixel belongs to an object box.
        covered = np.zeros((size, size), bool)
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            covered[y1:y2, x1:x2] = True
        assert not image[~covered].any()


def test_scene_layout_matches_its_metadata():
    for tag in TASKS:
        for scene in _scenes(11, 60, tag):
            meta = scene.metadata
            assert scene.prompt == meta["prompt"] and meta["tag"] == tag
            groups, start = [], 0
            for clause in meta["include"]:
                group = scene.objects[start : start + clause["count"]]
                start += clause["count"]
                groups.append(group)
                assert all(o.shape == clause["class"] for o in group)
                if "color" in clause:
                    assert all(o.color == clause["color"] for o in group)
            assert start == len(scene.objects)
            for clause in meta.get("exclude", []):
                assert sum(o.shape == clause["class"] for o in scene.objects) < clause["count"]
            for clause, group in zip(meta["include"], groups, strict=True):
                if "position" in clause:
                    relation, target = clause["position"]
                    for a in group:
                        for b in groups[target]:
                            # GenEval's own rule holds, and the layout shows this relation only.
                            assert relative_position(a.box, b.box) == {relation}


def test_position_layouts_keep_a_clear_margin():
    for scene in _scenes(12, 200, "position"):
        b, a = scene.objects
        relation = scene.metadata["include"][1]["position"][0]
        dx, dy = shapes._relation_offsets(a.box, b.box)
        main = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
        assert main >= shapes.RELATION_MARGIN


def test_untagged_objects_use_many_colours():
    colours = {o.color for s in _scenes(2, 200, "single_object") for o in s.objects}
    assert colours == set(PALETTE)


def test_rows_follow_the_official_templates():
    patterns = {
        "single_object": r"a photo of a (circle|square|triangle)",
        "two_object": r"a photo of a (\w+) and a (\w+)",
        "counting": r"a photo of (two|three|four) (circles|squares|triangles)",
        "colors": r"a photo of an? (\w+) (circle|square|triangle)",
        "position": r"a photo of a (\w+) (left of|right of|above|below) a (\w+)",
        "color_attr": r"a photo of an? (\w+) (\w+) and an? (\w+) (\w+)",
    }
    for tag in TASKS:
        for row in shapes.task_rows(tag):
            assert re.fullmatch(patterns[tag], row["prompt"]), row
            assert list(row) == (
                ["tag", "include", "exclude", "prompt"] if tag == "counting" else ["tag", "include", "prompt"]
            )
    assert {"a photo of an orange square", "a photo of a yellow square"} <= {
        r["prompt"] for r in shapes.task_rows("colors")
    }
    counting = shapes.row_for_prompt("a photo of three triangles")
    assert counting["include"] == [{"class": "triangle", "count": 3}]
    assert counting["exclude"] == [{"class": "triangle", "count": 4}]
    position = shapes.row_for_prompt("a photo of a circle left of a square")
    assert position["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]
    assert [len(shapes.task_rows(t)) for t in TASKS] == [3, 6, 9, 24, 24, 336]
    with pytest.raises(DataError):
        shapes.row_for_prompt("a photo of a hexagon")


@needs_official
def test_prompt_wording_reproduces_every_official_prompt():
    rows = shapes.read_suite(OFFICIAL)
    assert [shapes.prompt_from_metadata(r) for r in rows] == [r["prompt"] for r in rows]
    # Our rows use the same keys, in the same order, as the official rows of the same task.
    official_keys = {r["tag"]: (list(r), [sorted(c) for c in r["include"]]) for r in rows}
    for tag in TASKS:
        row = shapes.task_rows(tag)[0]
        assert (list(row), [sorted(c) for c in row["include"]]) == official_keys[tag]


def test_vocabulary_covers_every_prompt_and_nothing_more():
    vocab = set(shapes.vocabulary())
    words = {w for tag in TASKS for row in shapes.task_rows(tag) for w in row["prompt"].split()}
    words |= {w for p, _ in itertools.islice(shapes.training_stream(0), 300) for w in p.split()}
    assert words == vocab
    assert shapes.vocabulary() == sorted(vocab)


def test_prompt_suite_counts_and_uniqueness():
    suite = shapes.prompt_suite()
    counts = collections.Counter(r["tag"] for r in suite)
    assert [counts[t] for t in TASKS] == [80, 99, 80, 94, 100, 100]
    assert [r["tag"] for r in suite] == sorted((r["tag"] for r in suite), key=TASKS.index)
    assert len({r["prompt"] for r in suite if r["tag"] == "color_attr"}) == 100
    # Tasks with fewer distinct prompts repeat them evenly.
    per_prompt = collections.Counter(r["prompt"] for r in suite if r["tag"] == "two_object")
    assert len(per_prompt) == 6 and set(per_prompt.values()) <= {16, 17}
    assert shapes.prompt_suite(seed=0) == suite
    assert shapes.prompt_suite(seed=1) != suite
    quick = shapes.prompt_suite(counts=shapes.QUICK_COUNTS)
    assert len(quick) == 60 and collections.Counter(r["tag"] for r in quick) == shapes.QUICK_COUNTS
    assert len({json.dumps(r) for r in quick if r["tag"] in ("colors", "position", "color_attr")}) == 30
    only_counting = shapes.prompt_suite(counts={"counting": 5})
    assert len(only_counting) == 5 and {r["tag"] for r in only_counting} == {"counting"}
    for row in suite:
        scene = shapes.scene_from_metadata(np.random.default_rng(0), row)
        assert scene.prompt == row["prompt"]


def test_suite_files_round_trip(tmp_path):
    suite = shapes.prompt_suite(counts=shapes.QUICK_COUNTS)
    path = tmp_path / "sub" / "suite.jsonl"
    shapes.write_suite(suite, path)
    assert shapes.read_suite(path) == suite
    assert path.read_text().splitlines()[0] == json.dumps(suite[0])
    assert [p.name for p in path.parent.iterdir()] == ["suite.jsonl"]


@needs_official
def test_read_suite_accepts_the_official_file():
    rows = shapes.read_suite(OFFICIAL)
    assert len(rows) == 553
    counts = collections.Counter(r["tag"] for r in rows)
    assert [counts[t] for t in TASKS] == [80, 99, 80, 94, 100, 100]


def test_read_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        shapes.read_suite(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "p"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        shapes.read_suite(bad)
    bad.write_text('{"tag": "single_object", "include": [{"class": "circle", "count": 0}], "prompt": "p"}\n')
    with pytest.raises(DataError, match="count"):
        shapes.read_suite(bad)
    bad.write_text(
        '{"tag": "position", "include": [{"class": "a", "count": 1, "position": ["near", 0]}], "prompt": "p"}\n'
    )
    with pytest.raises(DataError, match="position"):
        shapes.read_suite(bad)


def test_scene_from_metadata_rejects_rows_outside_the_shapes_world():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="not a shape"):
        shapes.scene_from_metadata(
            rng, {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "p"}
        )
    with pytest.raises(DataError, match="palette"):
        shapes.scene_from_metadata(
            rng, {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}], "prompt": "p"}
        )
    with pytest.raises(DataError, match="at most 4"):
        shapes.scene_from_metadata(
            rng, {"tag": "counting", "include": [{"class": "circle", "count": 5}], "prompt": "p"}
        )


def test_render_rejects_objects_off_the_canvas():
    scene = Scene(objects=(ShapeObject("square", "red", 30.0, 30.0, 10),), prompt="p", metadata={})
    with pytest.raises(ValueError, match="does not fit"):
        shapes.render(scene, 32)
