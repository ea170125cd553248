"""Tiny random diffusers pipelines of the five supported families, built offline from code.

``build_tiny_pipeline("qwen-image" | "sana" | "sd3" | "flux" | "z-image", seed)`` returns a stock
``QwenImagePipeline``, ``SanaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``ZImagePipeline``
whose every part (transformer, VAE, text encoders, tokenizers, scheduler) is a real library class at a tiny size
with random weights, a function of ``seed`` only. Nothing is downloaded: the tokenizers are built from hand-made
vocabularies (the recipes of ``docs/ecosystem-notes.md``, section 2). Use them for tests and as the
``tiny-<family>`` models of recipes; ``save_tiny_pipeline`` writes one as a folder that
``<Pipeline>.from_pretrained`` loads.

Sizes (all at 32x32 pixels, 8x8 latents: every VAE downsamples 4x):

    family       transformer                          latent   tokens (image + text)
    qwen-image   QwenImageTransformer2DModel, 2 blocks  4 ch    16 + 64 (prompt and the template's 5-token tail)
    sana         SanaTransformer2DModel, 1 block        4 ch    16 + 48
    sd3          SD3Transformer2DModel, 2 blocks        4 ch    16 + 77 (CLIP) + 48 (T5)
    flux         FluxTransformer2DModel, 1 + 1 blocks   4 ch    16 + 48
    z-image      ZImageTransformer2DModel, 1 + 1 + 2     4 ch    16 + up to 64 (the prompt in the chat template)

The tiny Qwen tokenizer knows the words of the Qwen-Image prompt template, so the template's head is 34 tokens,
as with the real tokenizer, and the pipeline's ``prompt_template_encode_start_idx = 34`` drops exactly it. Z-Image
uses the same tokenizer with a minimal Qwen3 chat template (``Z_IMAGE_CHAT_TEMPLATE``) and a tiny ``Qwen3Model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_FAMILIES = ("qwen-image", "sana", "sd3", "flux", "z-image")
TINY_IMAGE_SIZE = 32
"""Default image side of the tiny pipelines (8x8 latents)."""
TINY_MAX_SEQUENCE_LENGTH = {"qwen-image": 64, "sana": 48, "sd3": 48, "flux": 48, "z-image": 64}
"""Text tokens the tiny models are used with (Qwen: after the template's head; SD3: the T5 part). The tiny
tokenizers spell most words letter by letter, so GenEval-style prompts take 20 to 50 tokens."""
QWEN_TEMPLATE_WORDS = (
    "system",
    "user",
    "assistant",
    "Describe",
    *(
        f" {word}"
        for word in [
            "the",
            "image",
            "by",
            "detailing",
            "color",
            "shape",
            "size",
            "texture",
            "quantity",
            "text",
            "spatial",
            "relationships",
            "of",
            "objects",
            "and",
            "background",
        ]
    ),
)
"""Words of the Qwen-Image prompt template that the tiny Qwen tokenizer holds as single tokens."""
Z_IMAGE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""The part of Qwen3's chat template that ``ZImagePipeline`` uses (one user message, a generation prompt)."""


def build_tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A stock diffusers pipeline of ``family`` with tiny random weights (a function of ``seed``), in eval mode.

    Args:
        family: One of ``TINY_FAMILIES``.
        seed: Seed of every random weight; the global RNG is left untouched.

    Raises:
        ValueError: Unknown family.
    """
    builders = {"qwen-image": _qwen_image, "sana": _sana, "sd3": _sd3, "flux": _flux, "z-image": _z_image}
    if family not in builders:
        raise ValueError(f"unknown tiny pipeline family {family!r}; expected one of {TINY_FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[family]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def save_tiny_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``directory`` (which ``from_pretrained`` then loads)."""
    directory = Path(directory)
    build_tiny_pipeline(family, seed).save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers (transformers 5 tokenizers take their vocabulary in the constructor: nothing is fetched)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map of byte-level BPE tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def qwen_tokenizer() -> Any:
    """A byte-level ``Qwen2Tokenizer``: every byte, plus the template words of ``QWEN_TEMPLATE_WORDS`` by merges."""
    from transformers import Qwen2Tokenizer

    byte_chars = _bytes_to_unicode()
    vocab = {"<|endoftext|>": 0}
    for char in byte_chars.values():
        vocab[char] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in QWEN_TEMPLATE_WORDS:  # a chain of merges builds each word from its first byte
        chars = "".join(byte_chars[b] for b in word.encode())
        token = chars[0]
        for char in chars[1:]:
            if (token, char) not in merges:
                merges.append((token, char))
            token += char
            vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def gemma_tokenizer() -> Any:
    """A byte-fallback ``GemmaTokenizer`` over the printable ASCII characters."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for char in map(chr, range(32, 127)):
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def clip_tokenizer() -> Any:
    """A ``CLIPTokenizer`` of every byte character and its end-of-word variant."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> Any:
    """A unigram ``T5Tokenizer`` over the printable ASCII characters (with and without the word marker)."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_text_config(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
    )


def _t5_encoder(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _autoencoder_kl(shift_factor: float, scaling_factor: float) -> Any:
    """A 3-level ``AutoencoderKL`` (4x downsampling) with 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


# ----------------------------------------------------------------------------------------------------------------
# The five families


def _qwen_image() -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    vocab_size = len(tokenizer)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],  # not 0 / 1, so the tests see the normalisation
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": vocab_size,
                "bos_token_id": 0,
                "eos_token_id": 0,
                "pad_token_id": 0,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
            },
            vision_config={
                "depth": 2,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            hidden_size=16,
            vocab_size=vocab_size,
            image_token_id=vocab_size + 3,
            video_token_id=vocab_size + 4,
            vision_start_token_id=vocab_size + 1,
            vision_end_token_id=vocab_size + 2,
        )
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _sana() -> Any:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=8,
        sample_size=TINY_IMAGE_SIZE // 4,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            initializer_range=0.02,
            intermediate_size=64,
            max_position_embeddings=8192,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
            attn_implementation="eager",
        )
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 4,
        patch_size=2,
        in_channels=4,
        num_layers=2,  # the last SD3 block has no context MLP and no to_add_out: two blocks have every LoRA target
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_autoencoder_kl(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(len(clip))),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(clip))),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(len(t5)),
        tokenizer_3=t5,
        transformer=transformer,
    )


def _flux() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_autoencoder_kl(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_clip_text_config(len(clip))),
        tokenizer=clip,
        text_encoder_2=_t5_encoder(len(t5)),
        tokenizer_2=t5,
        transformer=transformer,
    )


def _z_image() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = Z_IMAGE_CHAT_TEMPLATE
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],  # sums to the head dimension 16
        axes_lens=[256, 16, 16],
    )
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_autoencoder_kl(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
