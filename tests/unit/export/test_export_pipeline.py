"""ApexShapesPipeline (the file every diffusers export carries) against apex's own sampling, in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from apex_cli.core.sampler import SamplerSettings
from apex_cli.eval.generate import generate
from apex_cli.export.pipeline_apex_shapes import ApexShapesPipeline
from apex_cli.export.scheduling_apex import ApexSampler
from apex_cli.export.writer import checkpoint_samples
from apex_cli.models.shapes import ShapesModel, tensor_to_images


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # a tiny UNet: one thread is fastest, and immune to a busy machine


PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a red circle"]
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def model():
    return ShapesModel.build(block_out_channels=(16, 32), attention_heads=2, cross_attention_dim=32, norm_num_groups=8)


def pipeline(model, settings):
    """The model's parts in the exported pipeline; the UNet is a fresh copy without apex's target-time hooks."""
    unet = UNet2DConditionModel.from_config(model.unet.config)
    unet.load_state_dict(model.unet.state_dict())
    scheduler = ApexSampler(
        style=settings.style,
        nfe=settings.nfe,
        gap=settings.gap,
        kumaraswamy=settings.kumaraswamy,
        stochastic_ratio=settings.stochastic_ratio,
        guidance=settings.guidance,
    )
    pipe = ApexShapesPipeline(
        unet=unet.eval(), text_encoder=model.text_encoder, tokenizer=model.tokenizer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def test_checkpoint_samples_are_what_apex_sample_rounds_to_png(model):
    settings = SamplerSettings(style="few", nfe=2, gap=(0.001, 0.6))
    floats = checkpoint_samples(model, PROMPTS, SEEDS, settings)
    assert (tensor_to_images(floats) == generate(model, PROMPTS, SEEDS, settings)).all()


@pytest.mark.parametrize(
    "settings",
    [
        SamplerSettings(style="few", nfe=1),
        SamplerSettings(style="few", nfe=2, gap=(0.001, 0.6), stochastic_ratio=0.5),
        SamplerSettings(style="any", nfe=2, gap=(0.001, 0.6)),
        SamplerSettings(style="mul", nfe=3, gap=(0.0, 0.0), stochastic_ratio=0.0, guidance=2.0),
    ],
    ids=["few-1", "few-2", "any-2", "mul-3-guided"],
)
def test_pipeline_reproduces_apex_samples(model, settings):
    expected = checkpoint_samples(model, PROMPTS, SEEDS, settings)
    pipe = pipeline(model, settings)
    actual = pipe(PROMPTS, generator=generators(), output_type="latent").images
    assert (actual - expected).abs().max().item() < 1e-5
    pil = pipe(PROMPTS, generator=generators()).images
    assert [image.size for image in pil] == [(32, 32)] * 3
    assert (np.stack([np.asarray(image) for image in pil]) == tensor_to_images(expected)).all()  # apex's PNGs


def test_pipeline_outputs_and_its_errors(model):
    pipe = pipeline(model, SamplerSettings())
    images = pipe("a photo of a circle", num_images_per_prompt=2, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert pipe("a photo of a circle", output_type="np").images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        pipe("a photo of a dragon")
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a photo of a circle", height=33)
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        pipe(["a photo of a circle"] * 2, generator=[torch.Generator()])
