"""Image-caption folders, .jsonl / .parquet manifests, prompt files, and the seeded epoch order."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from apex_cli.data.captioned import batch_indices, epoch_of, list_examples, load_image
from apex_cli.errors import DataError


def _image(path, width=40, height=24, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def _folder(path, caption_extension=".txt"):
    return SimpleNamespace(name="folder", path=str(path), caption_extension=caption_extension)


def test_a_folder_pairs_every_image_with_the_caption_file_beside_it(tmp_path) -> None:
    _image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a red square\n")
    _image(tmp_path / "sub" / "a.jpg")
    (tmp_path / "sub" / "a.txt").write_text("a photo")
    examples = list_examples(_folder(tmp_path))
    assert [(e.caption, e.image.name) for e in examples] == [("a red square", "b.png"), ("a photo", "a.jpg")]


def test_an_image_without_its_caption_is_an_error_naming_the_file(tmp_path) -> None:
    _image(tmp_path / "lonely.png")
    with pytest.raises(DataError, match=r"data.path: .*lonely.png has no caption file lonely.txt"):
        list_examples(_folder(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        list_examples(_folder(tmp_path / "missing"))


def test_a_jsonl_manifest_resolves_images_next_to_it(tmp_path) -> None:
    _image(tmp_path / "img" / "x.png")
    rows = [{"file": "img/x.png", "text": "a cat"}, {"file": str(tmp_path / "img" / "x.png"), "text": "a dog"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = SimpleNamespace(
        name="manifest", path=str(tmp_path / "m.jsonl"), image_column="file", caption_column="text"
    )
    examples = list_examples(config)
    assert [e.caption for e in examples] == ["a cat", "a dog"]
    assert all(e.image == tmp_path / "img" / "x.png" for e in examples)
    bad = SimpleNamespace(name="manifest", path=str(tmp_path / "m.jsonl"), image_column="image", caption_column="text")
    with pytest.raises(DataError, match=r"line 1 has no 'image' field"):
        list_examples(bad)


def test_a_parquet_manifest_and_prompt_files(tmp_path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"caption": ["one", "two"], "image": ["a.png", "b.png"]}), tmp_path / "m.parquet")
    config = SimpleNamespace(
        name="manifest", path=str(tmp_path / "m.parquet"), image_column="image", caption_column="caption"
    )
    assert [e.caption for e in list_examples(config)] == ["one", "two"]
    prompts = SimpleNamespace(name="prompts", path=str(tmp_path / "m.parquet"), caption_column="caption")
    assert [(e.caption, e.image) for e in list_examples(prompts)] == [("one", None), ("two", None)]


def test_a_prompt_file_skips_blank_lines(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("a red circle\n\n  two squares  \n")
    examples = list_examples(SimpleNamespace(name="prompts", path=str(tmp_path / "p.txt"), caption_column="caption"))
    assert [(e.caption, e.image) for e in examples] == [("a red circle", None), ("two squares", None)]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        list_examples(SimpleNamespace(name="prompts", path=str(tmp_path / "empty.txt"), caption_column="caption"))


def test_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 30, 20))  # a white middle half
    image.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 2:14].min() > 200  # the crop kept the middle


def test_every_row_is_seen_once_an_epoch_and_batches_are_a_function_of_their_index() -> None:
    n, batch = 10, 4
    rows = [i for k in range(5) for i in batch_indices(n, batch, seed=3, batch=k)]  # 20 rows: two epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # each epoch its own order
    assert batch_indices(n, batch, seed=3, batch=2) == rows[8:12]  # a resumed run sees the same rows
    assert [epoch_of(n, batch, k) for k in range(5)] == [0, 0, 0, 1, 1]
