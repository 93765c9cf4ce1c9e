"""G and D for either objective: a GAN's generator and discriminator (pipeline.models, by `model.arch`)
or CycleGAN's pairs (pipeline.cyclegan: G: X -> Y with F: Y -> X, and D_X with D_Y).

The one place that asks which family a model is when building it: training, outputs, export and
the train stage call these, and pipeline.models does not know CycleGAN exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline import cyclegan, models

if TYPE_CHECKING:
    from pipeline.config import ModelConfig


def build_generator(spec: dict[str, Any]) -> nn.Module:
    """From a generator's spec (saved in every checkpoint)."""
    if spec.get("family") == "cyclegan":
        return cyclegan.build_generators(spec)
    return models.build_generator(spec)


def build_discriminator(
    model: ModelConfig, sample_shape: list[int] | tuple[int, ...], num_classes: int | None = None
) -> nn.Module:
    if model.family == "cyclegan":
        return cyclegan.CycleDiscriminators(model, tuple(sample_shape))
    return models.build_discriminator(model, sample_shape, num_classes)
