"""The shapes text-to-image model: tokenizer, cached text encoding, E4a target time, E5 shift hook, save / load."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from apex_cli.core.objective import evaluate
from apex_cli.core.shift import ConditionShift, shifted_condition
from apex_cli.data import shapes
from apex_cli.errors import CheckpointError, DataError
from apex_cli.models.shapes import (
    MAX_LENGTH,
    ShapesModel,
    build_tokenizer,
    build_unet,
    images_to_tensor,
    tensor_to_images,
)

TINY = {
    "block_out_channels": (16, 32),
    "norm_num_groups": 8,
    "attention_heads": 2,
    "cross_attention_dim": 32,
    "text_hidden_size": 16,
    "text_layers": 1,
    "text_heads": 2,
}
PROMPTS = ["a photo of a circle", "a photo of a red circle and a green square", "", "a photo of three triangles"]


def tiny_model(seed: int = 0, image_size: int = 32) -> ShapesModel:
    return ShapesModel.build(image_size=image_size, seed=seed, **TINY)


@pytest.fixture(scope="module")
def model() -> ShapesModel:
    return tiny_model()


def inputs(batch: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 0.9 + 0.05
    r = t * torch.rand(batch, generator=gen)
    return x, t, r


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_empty_prompt(model: ShapesModel, tmp_path) -> None:
    ids, mask = model.tokenize(["a photo of a red circle", ""])
    assert ids.shape == mask.shape == (2, MAX_LENGTH)
    vocab = model.tokenizer.get_vocab()
    assert ids[0, :7].tolist() == [vocab[w] for w in ["<s>", "a", "photo", "of", "a", "red", "circle"]]
    assert mask[0].tolist() == [1] * 7 + [0] * (MAX_LENGTH - 7)
    assert ids[1].tolist() == [vocab["<s>"]] + [vocab["[PAD]"]] * (MAX_LENGTH - 1)
    assert model.tokenizer.decode(ids[0], skip_special_tokens=True) == "a photo of a red circle"
    assert set(vocab) == {"[PAD]", "<s>", *shapes.vocabulary()}

    from transformers import PreTrainedTokenizerFast

    build_tokenizer().save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    again = loaded(["a photo of a red circle", ""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
    assert torch.equal(again["input_ids"], ids)


def test_every_suite_prompt_tokenizes(model: ShapesModel) -> None:
    prompts = sorted({row["prompt"] for row in shapes.prompt_suite(0)})
    ids, _ = model.tokenize(prompts)
    assert ids.shape == (len(prompts), MAX_LENGTH)


def test_unknown_word_is_a_data_error_listing_the_vocabulary(model: ShapesModel) -> None:
    with pytest.raises(DataError) as info:
        model.encode_prompts(["a photo of a dog and a pink square"])
    message = str(info.value)
    assert "\n" not in message
    assert "'dog'" in message and "'pink'" in message
    assert all(word in message for word in shapes.vocabulary())


def test_too_long_prompt_is_a_data_error(model: ShapesModel) -> None:
    with pytest.raises(DataError, match="at most 15"):
        model.tokenize([" ".join(["a"] * MAX_LENGTH)])
    model.tokenize([" ".join(["a"] * (MAX_LENGTH - 1))])  # exactly 16 tokens with <s>


# ----------------------------------------------------------------------------------------------------------------
# Text encoding


def test_encode_prompts_runs_the_encoder_once_per_prompt() -> None:
    model = tiny_model(seed=1)
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs))
    try:
        first = model.encode_prompts(PROMPTS)
        assert len(calls) == 1 and model.encoder_forwards == 1
        assert first["embeds"].shape == (4, MAX_LENGTH, 16) and first["embeds"].dtype == torch.float32
        assert first["mask"].shape == (4, MAX_LENGTH)
        second = model.encode_prompts(list(reversed(PROMPTS)))
        assert len(calls) == 1
        assert torch.equal(second["embeds"], first["embeds"].flip(0))
        model.encode_prompts(["a photo of a circle", "a photo of a blue square", "a photo of a blue square"])
        assert len(calls) == 2
        assert model.encode_prompts(["a photo of a blue square"])["embeds"].shape[0] == 1
        assert len(calls) == 2
        uncond = model.unconditional(3)
        assert len(calls) == 2
        assert torch.equal(uncond["embeds"], first["embeds"][2:3].expand(3, -1, -1))
    finally:
        handle.remove()


def test_text_encoder_is_frozen_and_outside_the_state_dict(model: ShapesModel) -> None:
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert all(key.startswith("unet.") for key in model.state_dict())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.unet.parameters()}


# ----------------------------------------------------------------------------------------------------------------
# Velocity, target time, condition shift


@pytest.mark.parametrize("size", [32, 64])
def test_velocity_shape(size: int) -> None:
    model = tiny_model(image_size=size)
    x, t, r = inputs(2, size)
    v = model.velocity(x, t, r, model.encode_prompts(PROMPTS[:2]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_images_round_trip() -> None:
    image = shapes.render_prompt("a photo of a red circle", seed=0)
    x = images_to_tensor(image[None])
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_images(x)[0], image)


def test_shift_hook_changes_exactly_the_masked_rows(model: ShapesModel) -> None:
    cond = model.encode_prompts(PROMPTS)
    mask = torch.tensor([True, False, True, False])
    plain = model.text_projection(cond["embeds"])
    with shifted_condition(model.text_projection, ConditionShift("negate"), mask):
        shifted = model.text_projection(cond["embeds"])
    assert torch.equal(shifted[mask], -plain[mask])
    assert torch.equal(shifted[~mask], plain[~mask])

    x, t, r = inputs(4)
    with torch.no_grad():
        v = model.velocity(x, t, r, cond)
        with shifted_condition(model.text_projection, ConditionShift("affine", seed=1), mask):
            v_shift = model.velocity(x, t, r, cond)
    assert torch.equal(v_shift[~mask], v[~mask])
    assert all((v_shift[i] - v[i]).abs().max() > 1e-4 for i in torch.nonzero(mask).flatten())


def test_fresh_student_reproduces_the_teacher_at_r_equal_t(model: ShapesModel) -> None:
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a teacher's own class embedding is arbitrary: it never matters at r = t
        for p in teacher.unet.class_embedding.parameters():
            p.normal_()
    unet_kwargs = {k: v for k, v in TINY.items() if not k.startswith("text_")}
    student = ShapesModel(
        build_unet(seed=11, text_dim=TINY["text_hidden_size"], **unet_kwargs), teacher.text_encoder, teacher.tokenizer
    )
    student.unet.load_state_dict(teacher.unet.state_dict())
    student.init_target_time_embedder()
    cond = teacher.encode_prompts(PROMPTS)
    x, t, r = inputs(4)
    with torch.no_grad():
        v_teacher = teacher.velocity(x, t, t, cond)
        v_student = student.velocity(x, t, t, cond)
        v_student_r = student.velocity(x, t, r, cond)
        v_teacher_r = teacher.velocity(x, t, r, cond)
    assert (v_student - v_teacher).abs().max().item() == 0.0
    assert (v_student_r - v_teacher).abs().amax(dim=(1, 2, 3)).min() > 1e-5
    assert (v_student_r - v_teacher_r).abs().amax(dim=(1, 2, 3)).min() > 1e-5


def test_target_time_term_is_scaled_by_t_minus_r_and_survives_deepcopy(model: ShapesModel) -> None:
    """The class embedding adds ``(t - r) Emb2(r)``; hooked exactly once, also on a deep copy of the UNet / model."""
    x, t, r = inputs(2)
    cond = model.encode_prompts(PROMPTS[:2])
    copies = [model, copy.deepcopy(model), ShapesModel(copy.deepcopy(model.unet), model.text_encoder, model.tokenizer)]
    for candidate in copies:
        embedder = candidate.unet.class_embedding
        captured: list[torch.Tensor] = []
        handle = embedder.register_forward_hook(lambda _m, _i, out, into=captured: into.append(out))
        try:
            with torch.no_grad():
                candidate.velocity(x, t, r, cond)
                unscaled = type(embedder).forward(embedder, candidate.unet.time_proj(r * 1000))  # no hooks
        finally:
            handle.remove()
        torch.testing.assert_close(captured[0], (t - r)[:, None] * unscaled, rtol=1e-5, atol=1e-6)


def test_negative_time_shift_runs_and_is_finite(model: ShapesModel) -> None:
    cond = model.encode_prompts(PROMPTS)
    x, t, r = inputs(4)
    mask = torch.tensor([False, True, False, True])
    with torch.no_grad():
        plain = model.velocity(x, t, r, cond)
        for name in ("negative_time", "negate+negative_time"):
            v = evaluate(model, x, t, r, cond, ConditionShift(name), mask)
            assert torch.isfinite(v).all()
            assert torch.equal(v[~mask], plain[~mask])
            assert (v[mask] - plain[mask]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Files


def test_save_and_load_in_a_new_process_gives_identical_velocities(model: ShapesModel, tmp_path) -> None:
    folder = tmp_path / "shapes"
    model.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == {"unet", "text_encoder", "tokenizer", "apex_model.json"}
    x, t, r = inputs(4, seed=7)
    with torch.no_grad():
        expected = model.velocity(x, t, r, model.encode_prompts(PROMPTS))
    torch.save({"x": x, "t": t, "r": r, "prompts": PROMPTS}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from apex_cli.models.shapes import ShapesModel
        data = torch.load({str(tmp_path / "inputs.pt")!r})
        model = ShapesModel.from_pretrained({str(folder)!r})
        with torch.no_grad():
            v = model.velocity(data["x"], data["t"], data["r"], model.encode_prompts(data["prompts"]))
        torch.save(v, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    loaded = torch.load(tmp_path / "out.pt")
    assert (loaded - expected).abs().max().item() == 0.0


def test_from_pretrained_rejects_a_foreign_folder(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a shapes model"):
        ShapesModel.from_pretrained(tmp_path)
    (tmp_path / "apex_model.json").write_text('{"model": "toy2d"}')
    with pytest.raises(CheckpointError, match="toy2d"):
        ShapesModel.from_pretrained(tmp_path)
