"""Small parts of the diffusers adapters: latent packing, token padding, the tiny builders and the family tables."""

from __future__ import annotations

import pytest
import torch

from apex_cli.config import DIFFUSERS_FAMILIES, DIFFUSERS_LORA_TARGETS
from apex_cli.models.diffusers_base import GENERATOR_MODULES, generator_class, pack_2x2, pad_tokens, unpack_2x2
from apex_cli.models.tiny import TINY_FAMILIES, TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline


def test_every_family_has_an_adapter_a_tiny_pipeline_and_default_lora_targets() -> None:
    assert tuple(GENERATOR_MODULES) == TINY_FAMILIES == DIFFUSERS_FAMILIES
    assert set(DIFFUSERS_LORA_TARGETS) == set(TINY_MAX_SEQUENCE_LENGTH) == set(DIFFUSERS_FAMILIES)
    for family in DIFFUSERS_FAMILIES:
        cls = generator_class(family)
        assert family == cls.FAMILY
        assert DIFFUSERS_LORA_TARGETS[family] == cls.DEFAULT_LORA_TARGETS
    with pytest.raises(ValueError, match="unknown diffusers family 'sdxl'"):
        generator_class("sdxl")
    with pytest.raises(ValueError, match="unknown tiny pipeline family 'sdxl'"):
        build_tiny_pipeline("sdxl")


def test_pack_2x2_matches_the_pipelines_packing_and_unpack_inverts_it() -> None:
    from diffusers import FluxPipeline, QwenImagePipeline

    latents = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    packed = pack_2x2(latents)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_2x2(packed, 6, 8), latents)
    assert torch.equal(unpack_2x2(packed, 6, 8), FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8))


def test_pad_tokens_pads_with_zeros_and_an_off_mask_or_cuts() -> None:
    embeds, mask = torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long)
    padded, padded_mask = pad_tokens(embeds, mask, 6)
    assert padded.shape == (2, 6, 5) and torch.equal(padded[:, :3], embeds) and not padded[:, 3:].any()
    assert padded_mask.tolist() == [[1, 1, 1, 0, 0, 0]] * 2
    cut, cut_mask = pad_tokens(embeds, mask, 2)
    assert torch.equal(cut, embeds[:, :2]) and cut_mask.shape == (2, 2)


def test_tiny_qwen_tokenizer_gives_the_template_head_its_real_34_tokens() -> None:
    pipe = build_tiny_pipeline("qwen-image")
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    assert drop == 34
    tokenizer = pipe.tokenizer
    assert len(tokenizer(template.split("{}")[0])["input_ids"]) == drop  # the pipeline drops exactly the head
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(template.format("a red cube"))["input_ids"])
    assert "".join(tokens[drop:-5]).replace("Ġ", " ") == "a red cube"  # then the prompt and a 5-token tail


def test_tiny_pipelines_are_a_function_of_their_seed() -> None:
    first, again, other = (build_tiny_pipeline("sd3", seed=s).transformer.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
