"""LoRA fine-tuning of the shapes model: a frozen base, peft adapters and the E4a target-time embedder.

Everything runs on a tiny UNet built from the shipped recipes with ``--set`` overrides, against a random "teacher"
checkpoint written in a temporary folder (the shipped teacher is not needed).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from apex_cli.config import LORA_TARGET_MODULES, dump_recipe, load_recipe
from apex_cli.errors import CheckpointError, RecipeError
from apex_cli.models.shapes import ShapesModel
from apex_cli.train import loop
from apex_cli.train.checkpoint import load_as_base, load_checkpoint_weights, load_weights, save_checkpoint
from apex_cli.train.loop import run_distillation
from apex_cli.train.tasks import build_task, load_checkpoint_model

TINY = [
    "model.block_out_channels=[16, 32]",
    "model.attention_heads=2",
    "model.cross_attention_dim=32",
    "model.norm_num_groups=8",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "hardware.device=cpu",
    "hardware.precision=fp32",
    "hardware.num_threads=1",
    "output.evaluate=false",
]
PROMPTS = ["a photo of a circle", "a photo of a red circle and a green square", "", "a photo of three triangles"]


def _lora_recipe(teacher, out, steps, extra=()):
    return load_recipe(
        "shapes-apex-lora-cpu",
        [
            *TINY,
            f"model.init={teacher}",
            "model.lora.rank=4",
            f"output.dir={out}",
            f"train.steps={steps}",
            "train.checkpoint_every=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random tiny teacher checkpoint with distinct online and EMA weights (the EMA ones are the teacher)."""
    path = tmp_path_factory.mktemp("teacher") / "run"
    recipe = load_recipe("shapes-teacher-cpu", [*TINY, f"output.dir={path}"])
    online = build_task(recipe).build_model()
    ema = copy.deepcopy(online)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for p in ema.unet.class_embedding.parameters():  # a teacher's own class embedding never matters at r = t
            p.normal_()
    weights = {"model": online.state_dict(), "ema": ema.state_dict()}
    save_checkpoint(path / "final", dump_recipe(recipe), weights, {"step": 1, "kind": "teacher"})
    return path


@pytest.fixture(scope="module")
def lora_run(teacher, tmp_path_factory):
    """A 3-step LoRA distillation; also returns the in-memory online and EMA models at its end."""
    captured = {}

    class RecordingEMA(loop.AdapterEMA):  # a LoRA run's EMA holds the adapters only
        def update(self, model):
            super().update(model)
            captured.update(online=model, ema=self.model)

    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "AdapterEMA", RecordingEMA)
        run_distillation(_lora_recipe(teacher, out, 3))
    return out, captured


def _tiny_student(teacher) -> tuple[ShapesModel, ShapesModel]:
    """``(student, teacher)``: the base loaded as a run loads ``model.init``, and the raw teacher EMA weights."""
    recipe = load_recipe("shapes-apex-lora-cpu", [*TINY, f"model.init={teacher}"])
    student = build_task(recipe).build_model()
    load_as_base(student, teacher)
    raw = build_task(recipe).build_model()
    load_weights(raw, teacher / "final", "ema")
    return student, raw


def _inputs(model: ShapesModel, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    t = torch.rand(4, generator=gen) * 0.9 + 0.05
    return x, t, t * torch.rand(4, generator=gen), model.encode_prompts(PROMPTS)


def test_fresh_lora_student_reproduces_the_teacher_at_r_equal_t(teacher) -> None:
    student, raw_teacher = _tiny_student(teacher)
    student.add_lora(rank=4, target_modules=LORA_TARGET_MODULES, dropout=0.1)
    student.train()  # dropout active: it acts on the adapters' input, and B = 0 still cancels it
    lora_b = [p for name, p in student.named_parameters() if "lora_B" in name]
    assert lora_b and all((p == 0).all() for p in lora_b)
    x, t, r, cond = _inputs(student)
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(x, t, t, cond), raw_teacher.velocity(x, t, t, cond))
        assert (student.velocity(x, t, r, cond) - raw_teacher.velocity(x, t, t, cond)).abs().max() > 1e-4


def test_only_adapters_and_target_time_embedder_train_and_the_base_stays_put(teacher) -> None:
    student, _ = _tiny_student(teacher)
    student.add_lora(rank=4, alpha=8, target_modules=LORA_TARGET_MODULES)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or name.startswith("unet.class_embedding.") for name in trainable)
    assert {f"unet.class_embedding.{n}" for n, _ in student.unet.class_embedding.named_parameters()} <= trainable
    for target in LORA_TARGET_MODULES:
        assert any(f".{target}.lora_A." in name for name in trainable), target
    assert set(student.trainable_state_dict()) == trainable
    assert len(trainable) < len(list(student.parameters())) / 2

    frozen_before = {k: v.clone() for k, v in student.state_dict().items() if k not in trainable}
    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=1e-2)
    x, t, r, cond = _inputs(student)
    for _ in range(3):
        optimizer.zero_grad()
        student.velocity(x, t, r, cond).square().mean().backward()
        optimizer.step()
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert any((p != 0).any() for name, p in student.named_parameters() if "lora_B" in name)


def test_trainable_state_dict_round_trips_strictly(teacher) -> None:
    student, _ = _tiny_student(teacher)
    student.add_lora(rank=4, target_modules=["to_q", "to_v"])
    state = {k: torch.randn_like(v) for k, v in student.trainable_state_dict().items()}
    other = copy.deepcopy(student)
    other.load_trainable_state_dict(state)
    assert all(torch.equal(other.trainable_state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="1 missing"):
        other.load_trainable_state_dict(dict(list(state.items())[1:]))
    with pytest.raises(CheckpointError, match="1 unexpected"):
        other.load_trainable_state_dict({**state, "unet.conv_in.weight": torch.zeros(1)})
    first = next(iter(state))
    with pytest.raises(CheckpointError, match="expected"):
        other.load_trainable_state_dict({**state, first: torch.zeros(1)})


def test_lora_run_writes_adapter_checkpoints(lora_run, teacher) -> None:
    run_dir, _ = lora_run
    final = run_dir / "final"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["adapters"] is True and meta["base"] == str(teacher) and len(meta["base_sha256"]) == 64
    for stem in ("model", "ema"):
        keys = load_file(str(final / f"{stem}.safetensors"))
        assert keys and all(".lora_" in k or k.startswith("unet.class_embedding.") for k in keys)
        full_size = (teacher / "final" / f"{stem}.safetensors").stat().st_size
        assert (final / f"{stem}.safetensors").stat().st_size < 0.5 * full_size
    assert (run_dir / "checkpoints" / "step_0000002" / "training_state.pt").is_file()
    trained = load_file(str(final / "model.safetensors"))
    assert any((v != 0).any() for k, v in trained.items() if ".lora_B." in k)  # the adapters did train


def test_lora_run_leaves_the_base_weights_untouched(lora_run, teacher) -> None:
    _, captured = lora_run
    reference, _ = _tiny_student(teacher)
    reference.add_lora(rank=4, target_modules=LORA_TARGET_MODULES)
    trained = captured["online"].state_dict()
    base = {k: v for k, v in reference.state_dict().items() if k not in reference.trainable_state_dict()}
    assert base and all(torch.equal(trained[k], v) for k, v in base.items())


def test_load_checkpoint_model_rebuilds_the_lora_student(lora_run) -> None:
    run_dir, captured = lora_run
    loaded, recipe, meta = load_checkpoint_model(run_dir)
    assert meta["adapters"] and recipe.model.lora.rank == 4 and loaded.has_lora
    x, t, r, cond = _inputs(loaded, seed=3)
    with torch.no_grad():
        expected = captured["ema"].eval().velocity(x, t, r, cond)
        torch.testing.assert_close(loaded.velocity(x, t, r, cond), expected)
        online = build_task(recipe).build_model()
        load_checkpoint_weights(online, run_dir, "model")
        torch.testing.assert_close(
            online.eval().velocity(x, t, r, cond), captured["online"].eval().velocity(x, t, r, cond)
        )


def test_a_lora_checkpoint_as_model_init_is_merged_into_plain_weights(lora_run) -> None:
    run_dir, _ = lora_run
    lora_student, recipe, _ = load_checkpoint_model(run_dir)
    plain = build_task(recipe).build_model()
    load_as_base(plain, run_dir)
    assert not plain.has_lora and all(p.requires_grad for p in plain.parameters())
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    x, t, r, cond = _inputs(plain, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(plain.velocity(x, t, r, cond), lora_student.velocity(x, t, r, cond))


def test_missing_or_changed_base_is_a_checkpoint_error(lora_run, tmp_path) -> None:
    run_dir, _ = lora_run
    copied = tmp_path / "copy"
    shutil.copytree(run_dir / "final", copied)
    meta_path = copied / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match=r"LoRA adapters only, and their base model .*gone.* cannot be read"):
        load_checkpoint_model(copied)
    meta_path.write_text(json.dumps({**meta, "base_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="has changed since they were trained"):
        load_checkpoint_model(copied)


def test_lora_needs_model_init_and_real_target_modules(teacher, tmp_path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe("shapes-apex-lora-cpu", ["model.init=null"])
    message = str(info.value)
    assert "\n" not in message
    assert "model.lora: LoRA adapts a trained base model, so it needs model.init" in message
    with pytest.raises(RecipeError, match=r"model.lora.target_modules: LoRA targets \['attn_nope'\] match no module"):
        run_distillation(_lora_recipe(teacher, tmp_path / "run", 1, ["model.lora.target_modules=[to_q, attn_nope]"]))


def test_resumed_lora_run_equals_an_uninterrupted_one(teacher, tmp_path) -> None:
    # The first part stops by a shorter train.steps; a cosine schedule follows train.steps, so it would decay
    # differently there: hold the lr constant (the schedule itself is tested in tests/unit/train/test_schedules.py).
    constant = ["train.lr_schedule=constant"]
    run_distillation(_lora_recipe(teacher, tmp_path / "whole", 4, constant))
    run_distillation(_lora_recipe(teacher, tmp_path / "parts", 2, constant))
    run_distillation(_lora_recipe(teacher, tmp_path / "parts", 4, constant), resume=True)
    for stem in ("model", "ema"):
        whole = load_file(str(tmp_path / "whole" / "final" / f"{stem}.safetensors"))
        parts = load_file(str(tmp_path / "parts" / "final" / f"{stem}.safetensors"))
        assert set(whole) == set(parts)
        assert all(torch.equal(whole[k], parts[k]) for k in whole), stem  # bit-exact
