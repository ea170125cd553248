"""E7 / E8 references of a LoRA run at no memory: the frozen base is the model with its adapters off, the EMA holds
the adapters only and is swapped in for its calls without disturbing the online step's backward pass."""

from __future__ import annotations

import copy

import torch

from apex_cli.config import validate_recipe
from apex_cli.train.ema import EMA, AdapterEMA, AdaptersDisabled
from apex_cli.train.loop import _arrange
from apex_cli.train.parallel import Layout
from apex_cli.train.tasks import build_task

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


def _recipe(reference: str, lora: bool, target_velocity: str = "data"):
    raw = {
        "name": "refs",
        "model": {"name": "tiny-qwen-image", "lora": {"rank": 4} if lora else None},
        "data": {"name": "shapes", "image_size": 32},
        "method": {"reference": reference, "enhanced_ratio": 0.5, "target_velocity": target_velocity},
        "train": {"steps": 1, "batch_size": 4, "lr": 1e-3},
        "output": {"dir": "unused", "evaluate": False},
    }
    return validate_recipe(raw, "test", [])


def _model(recipe):
    torch.manual_seed(0)
    model = build_task(recipe).build_model()
    base = copy.deepcopy(model)
    model.add_lora(4)
    with torch.no_grad():  # adapters that change the output
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.3)
    return model, base


def _inputs(model):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *model.latent_shape(32, 32), generator=gen)
    t = torch.rand(2, generator=gen) * 0.8 + 0.1
    return x, t, model.encode_prompts(PROMPTS)


def _storages(*modules) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def test_the_frozen_reference_of_a_lora_run_is_the_base_with_adapters_off_and_copies_nothing() -> None:
    recipe = _recipe("frozen", lora=True)
    model, base = _model(recipe)
    before = _storages(model)
    _, ema, models = _arrange(recipe, model, None, Layout())
    assert ema is None and isinstance(models.reference, AdaptersDisabled) and models.reference.module is model
    assert _storages(model) == before  # no parameter was copied
    x, t, cond = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(models.reference.velocity(x, t, t, cond), base.eval().velocity(x, t, t, cond))
        assert (model.velocity(x, t, t, cond) - base.velocity(x, t, t, cond)).abs().max() > 1e-3  # adapters back on


def test_the_ema_of_a_lora_run_holds_the_adapters_only_and_leaves_the_backward_pass_intact() -> None:
    recipe = _recipe("ema", lora=True)
    model, _ = _model(recipe)
    _, ema, _ = _arrange(recipe, model, None, Layout())
    assert isinstance(ema, AdapterEMA) and set(ema.model.shadow) == set(model.trainable_state_dict())
    shadow_bytes = sum(v.numel() for v in ema.model.shadow.values())
    assert shadow_bytes < 0.2 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for value in ema.model.shadow.values():
            value.mul_(0.5)  # an EMA that differs from the online weights
    x, t, cond = _inputs(model)
    expected = copy.deepcopy(model)
    expected.load_trainable_state_dict({k: v.clone() for k, v in ema.model.shadow.items()})

    def grads(with_reference_call: bool) -> list[torch.Tensor]:
        model.zero_grad()
        loss = model.velocity(x, t, t * 0.5, cond).square().mean()
        if with_reference_call:
            with torch.no_grad():
                reference = ema.model.velocity(x, t, t, cond)
            torch.testing.assert_close(reference, expected.eval().velocity(x, t, t, cond))
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads(False)
    swapped = grads(True)  # the swap happened between the forward and the backward
    assert all(torch.equal(a, b) for a, b in zip(plain, swapped, strict=True))
    before = {k: v.clone() for k, v in ema.model.shadow.items()}
    ema.update(model)
    assert any(not torch.equal(before[k], ema.model.shadow[k]) for k in before)


def test_full_fine_tuning_keeps_a_full_ema_copy() -> None:
    recipe = _recipe("ema", lora=False)
    torch.manual_seed(0)
    model = build_task(recipe).build_model()
    _, ema, models = _arrange(recipe, model, None, Layout())
    assert isinstance(ema, EMA) and models.reference is ema.model and models.rollout is ema.model
    assert not _storages(ema.model) & _storages(model)


def test_the_teacher_velocity_of_a_lora_run_is_the_base_with_adapters_off() -> None:
    recipe = _recipe("ema", lora=True, target_velocity="teacher")
    model, base = _model(recipe)
    before = _storages(model)
    _, ema, models = _arrange(recipe, model, None, Layout())
    assert isinstance(ema, AdapterEMA) and models.rollout is ema.model  # E8 still rolls the student's EMA
    assert isinstance(models.teacher, AdaptersDisabled) and models.teacher.module is model
    assert _storages(model) == before
    x, t, cond = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(models.teacher.velocity(x, t, t, cond), base.eval().velocity(x, t, t, cond))


def test_full_fine_tuning_holds_one_frozen_teacher_for_the_teacher_velocity() -> None:
    torch.manual_seed(0)
    for reference in ("ema", "frozen"):
        recipe = _recipe(reference, lora=False, target_velocity="teacher")
        model = build_task(recipe).build_model()
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
        _, _, models = _arrange(recipe, model, teacher, Layout())
        assert models.teacher is teacher  # the loaded teacher itself, not another copy
        if reference == "frozen":
            assert models.reference is teacher
        else:
            assert models.reference is models.rollout and models.reference is not teacher
