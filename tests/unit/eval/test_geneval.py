"""GenEval protocol: every scoring rule on hand-made detections, resumable and sharded generation, the results
file in the official format, and the summary as summary_scores.py computes it.

The expected values come from the official definitions in djghosh13/geneval evaluation/evaluate_images.py
(``relative_position``, ``evaluate``, ``evaluate_image``) and evaluation/summary_scores.py.
"""

import collections
import filecmp
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from apex_cli.data import shapes
from apex_cli.errors import DataError
from apex_cli.eval import geneval
from apex_cli.eval.detectors import Detection, ShapesDetector
from apex_cli.eval.geneval import GenEvalOptions, evaluate, relative_position, select_detections

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


def det(cls: str, box=(0, 0, 10, 10), score: float = 0.99, color: str | None = None) -> Detection:
    return Detection(box=tuple(float(v) for v in box), score=score, color=color, class_name=cls)


def at(cls: str, cx: float, cy: float, side: float = 10, **kw) -> Detection:
    return det(cls, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), **kw)


def group(*dets: Detection) -> dict[str, list[Detection]]:
    out: dict[str, list[Detection]] = {}
    for d in dets:
        out.setdefault(d.class_name, []).append(d)
    return out


# ----------------------------------------------------------------------------------------------------------------
# relative_position


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        ((-20, 0), {"left of"}),
        ((20, 0), {"right of"}),
        ((0, -20), {"above"}),  # image y grows downwards
        ((0, 20), {"below"}),
        ((-20, -20), {"left of", "above"}),  # dx = dy = -(20 - 2) / 28.28 = -0.64
        ((-20, 15), {"left of", "below"}),  # dx = -18/25 = -0.72, dy = 13/25 = 0.52
        ((-20, 12), {"left of"}),  # dx = -18/23.3 = -0.77, dy = 10/23.3 = 0.43
    ],
)
def test_relative_position_each_relation(offset, expected):
    b = (40, 40, 50, 50)
    a = (40 + offset[0], 40 + offset[1], 50 + offset[0], 50 + offset[1])
    assert relative_position(a, b) == expected


def test_relative_position_margin_changes_the_verdict():
    # Two 10 px boxes, centre offset (-4, -3): |o| = 5. Without the margin dx = -0.8 ("left of");
    # with it, o'_x = -(4 - 0.1 * 20) = -2 -> dx = -0.4 and o'_y = -(3 - 2) = -1 -> dy = -0.2: no relation.
    a, b = (16, 17, 26, 27), (20, 20, 30, 30)
    assert relative_position(a, b, position_threshold=0.0) == {"left of", "above"}
    assert relative_position(a, b) == set()
    # Offset (-6, 0): o'_x = -(6 - 2) = -4, dx = -4/6 = -0.67 -> left of; (-3.5, 0): -1.5/3.5 = -0.43 -> nothing.
    assert relative_position((14, 20, 24, 30), b) == {"left of"}
    assert relative_position((16.5, 20, 26.5, 30), b) == set()
    # Centres closer than the margin on both axes: the revised offset vanishes -> empty set (no division by 0).
    assert relative_position((19, 19, 29, 29), b) == set()
    assert relative_position(b, b) == set()
    # The margin scales with the box sizes: same centres, bigger boxes -> the relation disappears.
    assert relative_position((0, 20, 10, 30), (12, 20, 22, 30)) == {"left of"}
    assert relative_position((-50, -40, 60, 90), (-38, -40, 72, 90)) == set()


# ----------------------------------------------------------------------------------------------------------------
# evaluate: include / colour / position / exclude


def meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    row = {"tag": tag, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    row["prompt"] = "p"
    return row


def test_count_rule():
    m = meta("counting", [{"class": "circle", "count": 2}])
    assert evaluate(group(det("circle")), m, COLORS) == (False, "expected circle>=2, found 1")
    assert evaluate({}, m, COLORS) == (False, "expected circle>=2, found 0")
    assert evaluate(group(det("circle"), det("circle")), m, COLORS) == (True, "")
    assert evaluate(group(*[det("circle")] * 3), m, COLORS) == (True, "")  # include alone allows more
    two = meta("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
    assert evaluate(group(det("circle")), two, COLORS) == (False, "expected square>=1, found 0")
    assert evaluate(group(det("circle"), det("square")), two, COLORS)[0]


def test_exclude_rule():
    m = meta("counting", [{"class": "circle", "count": 2}], exclude=[{"class": "circle", "count": 3}])
    assert evaluate(group(*[det("circle")] * 2), m, COLORS) == (True, "")
    assert evaluate(group(*[det("circle")] * 3), m, COLORS) == (False, "expected circle<3, found 3")
    assert evaluate(group(*[det("circle")] * 5), m, COLORS) == (False, "expected circle<3, found 5")
    both = evaluate(
        group(det("circle"), det("square")),
        meta("x", [{"class": "circle", "count": 2}], [{"class": "square", "count": 1}]),
        COLORS,
    )
    assert both == (False, "expected circle>=2, found 1\nexpected square<1, found 1")


def test_colour_rule_uses_only_the_most_confident_objects():
    m = meta("colors", [{"class": "cup", "count": 1, "color": "red"}])
    assert evaluate(group(det("cup", color="red")), m, COLORS) == (True, "")
    # Detections arrive sorted: only the top `count` are checked, a red second one does not help.
    found = group(det("cup", score=0.9, color="blue"), det("cup", score=0.8, color="red"))
    assert evaluate(found, m, COLORS) == (False, "expected red cup>=1, found 0 red; and 1 blue")
    m2 = meta("x", [{"class": "cup", "count": 2, "color": "red"}])
    found = group(det("cup", color="white"), det("cup", color="red"), det("cup", color="red"))
    assert evaluate(found, m2, COLORS) == (False, "expected red cup>=2, found 1 red; and 1 red, 1 white")
    assert evaluate(group(det("cup", color=None)), m, COLORS) == (False, "expected red cup>=1, found 0 red; and ")


def test_position_rule():
    m = meta("position", [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}])
    ok = group(at("square", 40, 20), at("circle", 10, 20))
    assert evaluate(ok, m, COLORS) == (True, "")
    wrong = group(at("square", 10, 20), at("circle", 40, 20))
    assert evaluate(wrong, m, COLORS) == (False, "expected circle left of target, found right of target")
    close = group(at("square", 20, 20), at("circle", 17, 20))  # within the 0.1 margin: no relation
    assert evaluate(close, m, COLORS) == (False, "expected circle left of target, found  target")
    for relation, (cx, cy) in {"right of": (40, 20), "above": (20, 0), "below": (20, 40)}.items():
        m_rel = meta(
            "position", [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": [relation, 0]}]
        )
        assert evaluate(group(at("square", 20, 20), at("circle", cx, cy)), m_rel, COLORS) == (True, "")
        assert not evaluate(group(at("square", 20, 20), at("circle", 40 - cx, 40 - cy)), m_rel, COLORS)[0]
    no_target = evaluate(group(at("circle", 10, 20)), m, COLORS)
    assert no_target == (False, "expected square>=1, found 0\nno target for circle to be left of")


def test_position_is_not_checked_after_a_failed_colour():
    m = meta(
        "x",
        [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}],
    )
    found = group(at("square", 10, 20), at("circle", 40, 20, color="blue"))
    assert evaluate(found, m, COLORS) == (False, "expected red circle>=1, found 0 red; and 1 blue")


def test_every_object_must_hold_the_relation_to_every_target():
    m = meta("x", [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["left of", 0]}])
    found = group(at("square", 40, 10), at("square", 0, 30), at("circle", 20, 20))
    assert evaluate(found, m, COLORS) == (False, "expected circle left of target, found right of target")


def test_selection_thresholds_and_cap():
    dets = {"cup": [det("cup", score=s) for s in (0.3, 0.95, 0.31, 0.9, 0.5)] + [det("cup", score=0.6)] * 20}
    kept = select_detections(dets, 0.3)
    assert len(kept["cup"]) == 16 and kept["cup"][0].score == 0.95 and kept["cup"][-1].score == 0.6
    assert [d.score for d in select_detections(dets, 0.9)["cup"]] == [0.95]  # strictly greater than 0.9
    assert select_detections({"cup": [det("cup", score=0.2)]}, 0.3) == {}


class FixedDetector:
    colors = COLORS

    def __init__(self, found):
        self.found = found

    def detect(self, image):
        return self.found


def test_counting_uses_the_strict_threshold():
    found = group(det("circle", score=0.95), det("circle", score=0.85), det("circle", score=0.4))
    counting = meta("counting", [{"class": "circle", "count": 2}], exclude=[{"class": "circle", "count": 3}])
    image = np.zeros((8, 8, 3), np.uint8)
    correct, reason, selected = geneval.evaluate_image(image, counting, FixedDetector(found))
    assert (correct, reason, len(selected["circle"])) == (False, "expected circle>=2, found 1", 1)
    two = meta("two_object", [{"class": "circle", "count": 2}], exclude=[{"class": "circle", "count": 3}])
    assert geneval.evaluate_image(image, two, FixedDetector(found))[:2] == (False, "expected circle<3, found 3")
    lenient = GenEvalOptions(counting_threshold=0.8)
    assert geneval.evaluate_image(image, counting, FixedDetector(found), lenient)[0]


# ----------------------------------------------------------------------------------------------------------------
# Generation folders


def render_fn(calls: list | None = None, fail_after: int | None = None):
    """The renderer as a generator; records prompts and can fail once ``fail_after`` prompts were done."""

    def generate(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        if fail_after is not None and calls is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("interrupted")
        if calls is not None:
            calls.extend(dict.fromkeys(prompts))
        return [shapes.render_prompt(p, s) for p, s in zip(prompts, seeds, strict=True)]

    return generate


SUITE = shapes.prompt_suite(seed=3, counts={t: 3 for t in shapes.TASKS})


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def test_generate_images_layout_and_seeds(tmp_path):
    seen = []

    def generate(prompts, seeds):
        seen.append(seeds)
        return [shapes.render_prompt(p, s) for p, s in zip(prompts, seeds, strict=True)]

    report = geneval.generate_images(SUITE[:3], tmp_path, generate, images_per_prompt=2, seed=5)
    assert report.generated == [0, 1, 2] and report.skipped == []
    for index, row in enumerate(SUITE[:3]):
        folder = tmp_path / f"{index:05d}"
        written = json.loads((folder / "metadata.jsonl").read_text())
        assert written == {**row, "seed": geneval.prompt_seed(5, index)}
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert seen[index] == [written["seed"], written["seed"] + 1]
    assert not list(tmp_path.rglob(".*"))  # no temporary files left


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    geneval.generate_images(SUITE, whole, render_fn(), seed=1)
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        geneval.generate_images(SUITE, resumed, render_fn(calls, fail_after=7), seed=1)
    assert len(calls) == 7
    # A prompt whose PNGs were half done: the folder must not count as complete.
    (resumed / "00003" / "metadata.jsonl").unlink()
    again: list[str] = []
    progress = []
    report = geneval.generate_images(
        SUITE, resumed, render_fn(again), seed=1, progress=lambda d, n: progress.append((d, n))
    )
    assert report.skipped == [0, 1, 2, 4, 5, 6]
    assert report.generated == [3, *range(7, len(SUITE))] and len(again) == len(SUITE) - 6
    assert progress[-1] == (len(SUITE), len(SUITE))
    assert same_tree(whole, resumed)
    # A complete folder is left alone.
    assert geneval.generate_images(SUITE, resumed, render_fn([], fail_after=0), seed=1).generated == []


def test_a_failure_inside_a_prompt_leaves_it_incomplete(tmp_path):
    def broken(prompts, seeds):
        return [shapes.render_prompt(prompts[0], seeds[0]), np.zeros((4, 4), np.uint8)]

    with pytest.raises(ValueError, match="uint8"):
        geneval.generate_images(SUITE[:1], tmp_path, broken, images_per_prompt=2)
    assert (tmp_path / "00000" / "samples" / "0000.png").is_file()
    assert not (tmp_path / "00000" / "metadata.jsonl").exists()
    report = geneval.generate_images(SUITE[:1], tmp_path, render_fn(), images_per_prompt=2)
    assert report.generated == [0]
    # Changing the number of images or the seed regenerates instead of mixing runs.
    assert geneval.generate_images(SUITE[:1], tmp_path, render_fn(), images_per_prompt=3).generated == [0]
    assert geneval.generate_images(SUITE[:1], tmp_path, render_fn(), images_per_prompt=3, seed=9).generated == [0]
    assert len(list((tmp_path / "00000" / "samples").iterdir())) == 3


def test_shards_are_disjoint_and_add_up_to_the_whole_run(tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    geneval.generate_images(SUITE, whole, render_fn(), images_per_prompt=1)
    parts = [
        geneval.generate_images(SUITE, sharded, render_fn(), images_per_prompt=1, shard=(i, 3)).generated
        for i in range(3)
    ]
    assert sorted(i for part in parts for i in part) == list(range(len(SUITE)))
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    assert same_tree(whole, sharded)
    with pytest.raises(ValueError, match="shard"):
        geneval.generate_images(SUITE, sharded, render_fn(), shard=(3, 3))


def test_batching_prompts_writes_the_same_folders(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    geneval.generate_images(SUITE, one, render_fn(), images_per_prompt=2)
    sizes: list[int] = []

    def batched(prompts, seeds):
        sizes.append(len(prompts))
        return render_fn()(prompts, seeds)

    progress: list[tuple[int, int]] = []
    report = geneval.generate_images(
        SUITE, many, batched, images_per_prompt=2, batch_size=7, progress=lambda d, n: progress.append((d, n))
    )
    assert sizes == [6] * (len(SUITE) // 3)  # 7 images a call -> 3 whole prompts of 2 images
    assert report.generated == list(range(len(SUITE)))
    assert progress == [(3 * (k + 1), len(SUITE)) for k in range(len(SUITE) // 3)]
    assert same_tree(one, many)


# ----------------------------------------------------------------------------------------------------------------
# Results file and summary


def official_summary(path: Path) -> dict:
    """summary_scores.py, step by step, without pandas: pd.read_json(lines=True) gives one record a line."""
    df = [json.loads(line) for line in path.read_text().splitlines()]
    by_tag: dict[str, list[bool]] = {}  # df.groupby('tag', sort=False): first-appearance order
    for row in df:
        by_tag.setdefault(row["tag"], []).append(row["correct"])
    by_prompt: dict[str, list[bool]] = collections.defaultdict(list)  # df.groupby('metadata')
    for row in df:
        by_prompt[row["metadata"]].append(row["correct"])
    task_scores = [float(np.mean(v)) for v in by_tag.values()]
    return {
        "total_images": len(df),
        "total_prompts": len(by_prompt),
        "correct_images": float(np.mean([r["correct"] for r in df])),
        "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])),
        "tasks": {t: float(np.mean(v)) for t, v in by_tag.items()},
        "overall": float(np.mean(task_scores)),
    }


def mixed_folder(tmp_path: Path) -> Path:
    """The renderer's images for half the prompts, black images for the rest: some right, some wrong."""
    outdir = tmp_path / "images"

    def generate(prompts, seeds):
        prompt = prompts[0]
        if zlib.crc32(prompt.encode()) % 2 and "three" not in prompt:
            return [np.zeros((32, 32, 3), np.uint8) for _ in seeds]
        return [shapes.render_prompt(prompt, s) for s in seeds]

    geneval.generate_images(SUITE, outdir, generate, images_per_prompt=2)
    return outdir


def test_results_rows_have_the_official_fields_and_types(tmp_path):
    outdir = mixed_folder(tmp_path)
    rows = geneval.score_folder(outdir, ShapesDetector())
    assert len(rows) == 2 * len(SUITE)
    written = geneval.read_results(outdir / "results.jsonl")
    assert written == rows
    for row in written:
        assert list(row) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
        assert isinstance(row["correct"], bool)
        assert all(isinstance(row[k], str) for k in ("filename", "tag", "prompt", "reason", "metadata", "details"))
        folder = Path(row["filename"]).parent.parent
        assert Path(row["filename"]).parent.name == "samples" and folder.parent == outdir
        metadata = json.loads(row["metadata"])
        assert metadata == json.loads((folder / "metadata.jsonl").read_text())
        assert (row["tag"], row["prompt"]) == (metadata["tag"], metadata["prompt"])
        details = json.loads(row["details"])
        for cls, boxes in details.items():
            assert cls in shapes.SHAPES
            assert all(len(b) == 5 and all(isinstance(v, float) for v in b) for b in boxes)
        assert row["correct"] == (row["reason"] == "")
    assert {r["correct"] for r in rows} == {True, False}


def test_summary_matches_the_official_script(tmp_path):
    outdir = mixed_folder(tmp_path)
    rows = geneval.score_folder(outdir, ShapesDetector(), outfile=tmp_path / "out" / "results.jsonl")
    expected = official_summary(tmp_path / "out" / "results.jsonl")
    summary = geneval.summarize(rows)
    assert {k: summary[k] for k in ("total_images", "total_prompts")} == {
        k: expected[k] for k in ("total_images", "total_prompts")
    }
    assert summary["correct_images"] == pytest.approx(expected["correct_images"])
    assert summary["correct_prompts"] == pytest.approx(expected["correct_prompts"])
    assert {t: v["accuracy"] for t, v in summary["tasks"].items()} == pytest.approx(expected["tasks"])
    assert list(summary["tasks"]) == list(expected["tasks"]) == list(shapes.TASKS)
    assert summary["overall"] == pytest.approx(expected["overall"])


def test_results_file_reads_with_pandas_like_the_official_script(tmp_path):
    pd = pytest.importorskip("pandas")
    outdir = mixed_folder(tmp_path)
    rows = geneval.score_folder(outdir, ShapesDetector())
    df = pd.read_json(outdir / "results.jsonl", orient="records", lines=True)
    assert list(df.columns) == list(geneval.RESULT_FIELDS)
    task_scores = [task_df["correct"].mean() for _, task_df in df.groupby("tag", sort=False)]
    assert len(df.groupby("metadata")) == geneval.summarize(rows)["total_prompts"]
    assert np.mean(task_scores) == pytest.approx(geneval.summarize(rows)["overall"])


def test_overall_is_the_unweighted_mean_of_tasks():
    rows = [{"tag": "a", "correct": True, "metadata": "m1"}] * 9 + [{"tag": "a", "correct": False, "metadata": "m1"}]
    rows += [{"tag": "b", "correct": False, "metadata": "m2"}, {"tag": "b", "correct": False, "metadata": "m3"}]
    summary = geneval.summarize(rows)
    assert summary["tasks"]["a"] == {"correct": 9, "total": 10, "accuracy": 0.9}
    assert summary["overall"] == pytest.approx(0.45)  # not 9/12
    assert summary["total_prompts"] == 3 and summary["correct_prompts"] == pytest.approx(1 / 3)
    console = Console(record=True, width=100)
    console.print(geneval.summary_table(summary))
    text = console.export_text()
    assert "90.00%" in text and "0.45000" in text
    with pytest.raises(DataError):
        geneval.summarize([])


def test_score_folder_refuses_unfinished_or_empty_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        geneval.score_folder(tmp_path / "nope", ShapesDetector())
    with pytest.raises(DataError, match="no prompt folders"):
        geneval.score_folder(tmp_path, ShapesDetector())
    geneval.generate_images(SUITE[:2], tmp_path, render_fn(), images_per_prompt=1)
    (tmp_path / "00001" / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="00001") as err:
        geneval.score_folder(tmp_path, ShapesDetector())
    assert "resume" in err.value.hint


def test_shapes_detector_scores_renderer_high_and_blank_or_noise_low(tmp_path):
    """Quick version of bench/geneval_detector.py on the 60-prompt quick suite, 4 images a prompt."""
    suite = shapes.prompt_suite(seed=11, counts=shapes.QUICK_COUNTS)
    rng = np.random.default_rng(0)
    makers = {
        "renderer": lambda prompts, seeds: [shapes.render_prompt(p, s) for p, s in zip(prompts, seeds, strict=True)],
        "black": lambda prompts, seeds: [np.zeros((32, 32, 3), np.uint8) for _ in seeds],
        "noise": lambda prompts, seeds: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in seeds],
    }
    scores = {}
    for name, make in makers.items():
        geneval.generate_images(suite, tmp_path / name, make)
        scores[name] = geneval.summarize(geneval.score_folder(tmp_path / name, ShapesDetector()))["overall"]
    assert scores["renderer"] >= 0.99
    assert scores["black"] <= 0.05 and scores["noise"] <= 0.05
