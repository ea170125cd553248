"""Generator adapters of the five diffusers families on tiny random pipelines built offline.

Every test runs on each of Qwen-Image, SANA, SD3, FLUX and Z-Image. The teacher side is always the *stock* pipeline
or its stock transformer called as the pipeline source calls it (``_stock_velocity``), so the adapters' packing,
prompt encoding and time conversion are checked against diffusers itself, not against themselves.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from apex_cli.config import DIFFUSERS_LORA_TARGETS
from apex_cli.core.objective import ObjectiveModels, ObjectiveSettings, apex_loss, cat_conditions, evaluate
from apex_cli.core.shift import ConditionShift, shifted_condition
from apex_cli.data import shapes
from apex_cli.errors import CheckpointError
from apex_cli.models.diffusers_base import TARGET_TIME_FILE, generator_class, pack_2x2, unpack_2x2
from apex_cli.models.shapes import images_to_tensor
from apex_cli.models.tiny import TINY_FAMILIES, build_tiny_pipeline, save_tiny_pipeline

PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a circle left of a triangle",
    "a photo of a blue triangle",
]
FAMILIES = pytest.mark.parametrize("family", TINY_FAMILIES)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the tiny models are far faster on one thread, above all on a busy machine


def tiny(family: str, **kwargs):
    return generator_class(family).tiny(seed=0, **kwargs)


def _inputs(generator, batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *generator.latent_shape(32, 32), generator=gen)
    t = torch.rand(batch, generator=gen) * 0.9 + 0.05
    return x, t, t * torch.rand(batch, generator=gen), generator.encode_prompts(PROMPTS[:batch])


def _stock_velocity(pipe, family: str, x, t, cond):
    """The stock transformer's output at ``(x, t)``, called as the family's pipeline ``__call__`` calls it."""
    transformer = pipe.transformer
    batch, channels, height, width = x.shape
    sigma_1000 = t * 1000  # the scheduler's timesteps
    with torch.no_grad():
        if family == "qwen-image":
            out = transformer(
                hidden_states=pipe._pack_latents(x, batch, channels, height, width),
                timestep=sigma_1000 / 1000,
                encoder_hidden_states=cond["embeds"],
                encoder_hidden_states_mask=cond["mask"],
                img_shapes=[[(1, height // 2, width // 2)]] * batch,
                return_dict=False,
            )[0]
            return pipe._unpack_latents(out, height * 4, width * 4, 4)[:, :, 0]
        if family == "sana":
            timestep = sigma_1000 * transformer.config.timestep_scale
            return transformer(
                x, encoder_hidden_states=cond["embeds"], encoder_attention_mask=cond["mask"], timestep=timestep
            )[0]
        if family == "sd3":
            return transformer(
                hidden_states=x,
                timestep=sigma_1000,
                encoder_hidden_states=cond["embeds"],
                pooled_projections=cond["pooled"],
            )[0]
        if family == "z-image":  # reversed time; one caption of its own length a sample; the output is -v
            captions = [embeds[mask.bool()] for embeds, mask in zip(cond["embeds"], cond["mask"], strict=True)]
            out = transformer(list(x.unsqueeze(2).unbind(0)), (1000 - sigma_1000) / 1000, captions, return_dict=False)
            return -torch.stack(out[0]).squeeze(2)
        out = transformer(
            hidden_states=pipe._pack_latents(x, batch, channels, height, width),
            timestep=sigma_1000 / 1000,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"],
            txt_ids=torch.zeros(cond["embeds"].shape[1], 3),
            img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return pipe._unpack_latents(out, height * 4, width * 4, 4)


def _shapes_latents(generator, batch: int, seed: int):
    images = np.stack([shapes.render_prompt(PROMPTS[i % len(PROMPTS)], seed + i) for i in range(batch)])
    return generator.encode_images(images_to_tensor(images))


def _apex_steps(generator, steps: int = 3, lr: float = 1e-3) -> list[dict[str, float]]:
    """``steps`` optimizer steps of the project's APEX objective (all four roles, E7, E8 with N = 2, E12)."""
    batch = 8
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    x_data = _shapes_latents(generator, batch, seed=0)
    cond, uncond = generator.encode_prompts(prompts), generator.unconditional(batch)
    ema = copy.deepcopy(generator).requires_grad_(False)  # a reference / rollout copy, as with an EMA
    models = ObjectiveModels(online=generator, reference=ema, rollout=ema)
    settings = ObjectiveSettings(enhanced_ratio=0.5, estimate_order=2, dist_match_coef=0.5)
    shift = ConditionShift("negate")
    optimizer = torch.optim.AdamW(generator.trainable_parameters(), lr=lr, betas=(0.9, 0.99))
    generator.train()
    history = []
    for _ in range(steps):
        out = apex_loss(models, x_data, cond, uncond, settings, shift)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(generator.trainable_parameters(), 1.0)
        optimizer.step()
        history.append({k: v.item() for k, v in out.terms.items()})
    return history


# ----------------------------------------------------------------------------------------------------------------
# Training: 3 APEX steps with LoRA and with full fine-tuning


@FAMILIES
def test_three_apex_steps_with_lora_train_only_the_adapters_and_the_target_time_embedder(family) -> None:
    generator = tiny(family)
    generator.add_lora(rank=4, alpha=8)
    trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert trainable == set(generator.trainable_state_dict())
    assert all(".lora_" in n or n.startswith("target_time_embedder.") for n in trainable)
    for target in DIFFUSERS_LORA_TARGETS[family]:
        assert any(f".{target}.lora_A." in n for n in trainable), target
    before = {k: v.clone() for k, v in generator.state_dict().items()}

    history = _apex_steps(generator)

    assert all(np.isfinite(list(h.values())).all() for h in history), history
    assert {"main", "fake", "adversarial", "total"} <= set(history[0])
    after = generator.state_dict()
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    # B starts at 0. The last dual-stream block's text queries and text outputs never reach the image tokens
    # (Qwen-Image, SD3), so their adapters get no gradient; every other adapter trained (Z-Image: all of them).
    blocks = "layers" if family == "z-image" else "transformer_blocks"
    last = f"transformer.{blocks}.{len(generator.transformer.get_submodule(blocks)) - 1}."
    lora_b = [k for k in trainable if ".lora_B." in k]
    dead = [k for k in lora_b if not (after[k] != 0).any()]
    assert all(k.startswith(last) and any(s in k for s in ("add_q_proj", "to_add_out", "txt_mlp")) for k in dead), dead
    assert len(dead) <= len(lora_b) / 4
    assert all(not torch.equal(after[k], before[k]) for k in trainable if k.startswith("target_time_embedder."))


@FAMILIES
def test_three_apex_steps_with_full_fine_tuning_change_the_transformer_only(family) -> None:
    generator = tiny(family)
    text_encoder = generator.pipeline.text_encoder
    encoder_before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    before = {k: p.detach().clone() for k, p in generator.named_parameters()}
    assert all(p.requires_grad for p in generator.parameters())

    history = _apex_steps(generator)

    assert all(np.isfinite(list(h.values())).all() for h in history), history
    after = dict(generator.named_parameters())
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert len(changed) > 0.8 * len(before), f"{len(changed)} of {len(before)} tensors changed"
    assert any(k.startswith("target_time_embedder.") for k in changed)
    assert all(torch.equal(text_encoder.state_dict()[k], v) for k, v in encoder_before.items())


# ----------------------------------------------------------------------------------------------------------------
# The teacher at initialisation, time units, packing, prompt encoding and the VAE against the stock pipeline


@FAMILIES
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fresh_student_reproduces_the_teacher_velocity_at_r_equal_t(family, mode) -> None:
    teacher = build_tiny_pipeline(family, seed=0)
    student = tiny(family)
    if mode == "lora":
        student.add_lora(rank=4, dropout=0.1, init="gaussian")
        student.train()  # dropout acts on the adapters' input; B = 0 still cancels it
    x, t, r, cond = _inputs(student)
    with torch.no_grad():
        v_teacher = _stock_velocity(teacher, family, x, t, cond)
        assert torch.equal(student.velocity(x, t, t, cond), v_teacher)  # bit for bit
        v_r = student.velocity(x, t, r, cond)
    assert (v_r - v_teacher).abs().amax(dim=(1, 2, 3)).min() > 1e-5  # E4a: r enters away from r = t


@FAMILIES
def test_velocity_and_decode_match_one_step_of_the_stock_pipeline(family) -> None:
    """At t = 1 one Euler step of the stock pipeline lands on ``z - v``; its image is the decoded latent."""
    pipe = build_tiny_pipeline(family, seed=0)
    generator = tiny(family)
    noise = torch.randn(1, *generator.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    kwargs = {"num_inference_steps": 1, "height": 32, "width": 32, "max_sequence_length": generator.max_sequence_length}
    if family in ("sana", "sd3"):
        kwargs.update(guidance_scale=1.0, latents=noise)  # no CFG: the conditional velocity alone
    elif family == "z-image":
        kwargs.update(guidance_scale=0.0, latents=noise)  # Z-Image: CFG for any guidance_scale > 0
    else:
        kwargs.update(latents=pack_2x2(noise))
    if family == "sana":
        kwargs.update(use_resolution_binning=False)
    stepped = pipe(PROMPTS[0], output_type="latent", **kwargs).images
    if family in ("qwen-image", "flux"):
        stepped = unpack_2x2(stepped, *noise.shape[2:])
    image = pipe(PROMPTS[0], output_type="pt", **kwargs).images

    with torch.no_grad():
        v = generator.velocity(noise, torch.ones(1), torch.ones(1), generator.encode_prompts(PROMPTS[:1]))
    torch.testing.assert_close(noise - stepped, v, rtol=1e-4, atol=1e-5)
    decoded = (generator.decode_latents(noise - v) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, image, rtol=1e-4, atol=1e-4)


@FAMILIES
def test_encode_images_applies_the_family_latent_normalisation(family) -> None:
    generator = tiny(family)
    images = images_to_tensor(np.stack([shapes.render_prompt(p, 0) for p in PROMPTS[:2]]))
    latents = generator.encode_images(images)
    assert latents.shape == (2, *generator.latent_shape(32, 32))
    vae = generator.vae
    with torch.no_grad():
        if family == "qwen-image":
            raw = vae.encode(images[:, :, None]).latent_dist.mean[:, :, 0]
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
            expected = (raw - mean) / std
        elif family == "sana":
            expected = vae.encode(images).latent * vae.config.scaling_factor
        else:
            expected = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)


@FAMILIES
def test_prompts_are_encoded_once_and_conditions_batch_with_the_unconditional_one(family) -> None:
    generator = tiny(family)
    first = generator.encode_prompts(PROMPTS)
    assert generator.encoder_forwards == 1
    again = generator.encode_prompts([PROMPTS[2], PROMPTS[0]])
    assert generator.encoder_forwards == 1
    assert all(torch.equal(again[k], first[k][[2, 0]]) for k in first)
    uncond = generator.unconditional(4)
    uncond_again = generator.unconditional(2)
    assert generator.encoder_forwards == 2
    assert all(torch.equal(uncond_again[k], uncond[k][:2]) for k in uncond)
    both = cat_conditions(first, uncond)  # one forward for cond and uncond (E7)
    assert all(v.shape[0] == 8 for v in both.values())
    assert not torch.equal(uncond["embeds"][0], first["embeds"][0])
    direct = generator._encode([generator.unconditional_prompt], unconditional=True)
    assert torch.equal(uncond["embeds"][0], direct["embeds"][0])
    assert generator.unconditional_prompt == (" " if family == "qwen-image" else "")


# ----------------------------------------------------------------------------------------------------------------
# Condition shift (E5) and the target-time embedder (E4a)


@FAMILIES
def test_condition_shift_hook_changes_exactly_the_masked_rows_of_the_text_projection(family) -> None:
    generator = tiny(family)
    x, t, _, cond = _inputs(generator)
    mask = torch.tensor([True, False, True, False])
    captured = []

    def capture(_module, _inputs, output):
        captured.append(output.detach().clone())

    shift = ConditionShift("negate")
    with torch.no_grad():
        handle = generator.text_projection.register_forward_hook(capture)
        v_plain = generator.velocity(x, t, t, cond)
        handle.remove()
        with shifted_condition(generator.text_projection, shift, mask):
            handle = generator.text_projection.register_forward_hook(capture)  # runs after the shift hook
            v_shift = generator.velocity(x, t, t, cond)
            handle.remove()
        assert torch.equal(evaluate(generator, x, t, t, cond, shift, mask), v_shift)  # the objective's own path
    plain, shifted = captured
    assert torch.equal(shifted[mask], -plain[mask])
    assert torch.equal(shifted[~mask], plain[~mask])
    assert torch.equal(v_shift[~mask], v_plain[~mask])
    assert (v_shift[mask] - v_plain[mask]).abs().amax(dim=(1, 2, 3)).min() > 1e-5


def test_z_image_condition_shift_negates_exactly_the_fake_samples_tokens_of_the_flat_cap_embedder_output() -> None:
    """Z-Image's transformer calls ``cap_embedder`` on the batch's captions concatenated; the shift, applied to the
    per-sample view ``text_projection``, must reach exactly the fake samples' tokens of that flat output."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    generator = tiny("z-image")
    x, t, _, cond = _inputs(generator)
    mask = torch.tensor([True, False, True, False])
    captured = []
    lengths = [int(n) + (-int(n)) % SEQ_MULTI_OF for n in cond["mask"].sum(dim=1)]
    token_mask = torch.repeat_interleave(mask, torch.tensor(lengths))
    cap_embedder = generator.transformer.cap_embedder
    with torch.no_grad():
        handle = cap_embedder.register_forward_hook(lambda _m, _i, out: captured.append(out.clone()))
        generator.velocity(x, t, t, cond)
        with shifted_condition(generator.text_projection, ConditionShift("negate"), mask):
            generator.velocity(x, t, t, cond)
        handle.remove()
    plain, shifted = captured
    assert plain.shape[0] == sum(lengths)
    assert torch.equal(shifted[token_mask], -plain[token_mask])
    assert torch.equal(shifted[~token_mask], plain[~token_mask])


@FAMILIES
def test_target_time_embedder_is_scaled_by_t_minus_r_and_a_deep_copy_uses_its_own(family) -> None:
    generator = tiny(family)
    x, t, r, cond = _inputs(generator)
    clone = copy.deepcopy(generator)
    assert clone._frozen is generator._frozen  # text encoders, VAE and the prompt cache are shared, not copied
    assert clone.transformer is not generator.transformer
    with torch.no_grad():
        for p in clone.target_time_embedder.parameters():
            p.mul_(2.0)
        v = generator.velocity(x, t, r, cond)
        v_clone = clone.velocity(x, t, r, cond)
        assert torch.equal(clone.velocity(x, t, t, cond), generator.velocity(x, t, t, cond))
        assert torch.equal(generator.velocity(x, t, r, cond), v)  # the original is untouched by the copy
    assert (v_clone - v).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Files: the pipeline folder and the saved LoRA adapters


@FAMILIES
def test_saved_lora_loads_in_the_stock_pipeline_from_a_local_folder_and_changes_its_output(
    family, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_tiny_pipeline(family, tmp_path / "pipeline", seed=0)
    student = generator_class(family).from_pretrained(folder, max_sequence_length=tiny(family).max_sequence_length)
    student.add_lora(rank=4, alpha=8)  # alpha != rank: the saved peft config must carry the scale
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    student.eval()
    x, t, _, cond = _inputs(student, seed=5)
    with torch.no_grad():
        expected = student.velocity(x, t, t, cond)
    saved = student.save_lora_weights(tmp_path / "lora")
    assert {p.name for p in saved.iterdir()} == {"pytorch_lora_weights.safetensors", TARGET_TIME_FILE}

    import diffusers

    stock = getattr(diffusers, student.PIPELINE_CLASS).from_pretrained(folder)
    before = _stock_velocity(stock, family, x, t, cond)
    stock.load_lora_weights(saved)
    after = _stock_velocity(stock, family, x, t, cond)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_from_pretrained_reports_a_missing_folder_as_a_checkpoint_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"cannot load .* as a QwenImagePipeline"):
        generator_class("qwen-image").from_pretrained(tmp_path / "nothing-here")


def test_a_pipeline_of_another_family_and_unknown_lora_targets_are_refused() -> None:
    with pytest.raises(CheckpointError, match="needs a FluxPipeline, got SanaPipeline"):
        generator_class("flux")(build_tiny_pipeline("sana"))
    generator = tiny("sd3")
    with pytest.raises(ValueError, match=r"LoRA targets \['txt_mlp.net.2'\] match no module of the sd3 transformer"):
        generator.add_lora(rank=4, target_modules=["attn.to_q", "txt_mlp.net.2"])
    assert not generator.has_lora
