"""Objectives: what a model family trains, as one object the loop and the stages ask.

An `Objective` owns its networks (G and D from a spec and the model config), its training step, its
extra state (CycleGAN's history pools, saved in every checkpoint), and what it trains on (labels and
held-out reals, one domain or two). The training loop, the Ray workers and the stages ask
`objective(family)` and never compare family names.

- `gan`: a generator and a discriminator (pipeline.core.models, by `model.arch`), stepped by
  `steps.gan_step` with the configured loss.
- `cyclegan`: the pairs G: X -> Y with F: Y -> X and D_X with D_Y (pipeline.core.cyclegan), stepped by
  `cyclegan.cycle_step`; it never sees labels, and trains on two domains (data.target).

A new family is one module with its networks and step plus one entry in OBJECTIVES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from pipeline.core import cyclegan, models, steps

if TYPE_CHECKING:
    from pipeline.core.config import Config, ModelConfig, TrainConfig


def _no_state(_: TrainConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Objective:
    family: str
    # the generator's spec (saved in every checkpoint: it rebuilds G without the training config)
    generator_spec: Callable[[ModelConfig, list[int], int | None], dict[str, Any]]
    generator: Callable[[dict[str, Any]], nn.Module]  # G from its spec
    discriminator: Callable[[ModelConfig, tuple[int, ...], int | None], nn.Module]
    # one training step: (gan, cfg, batches, step, gradient sync) -> the step's statistics on the device
    step: Callable[[steps.GAN, Config, steps.Batches, int, steps.GradSync], dict[str, torch.Tensor]]
    state: Callable[[TrainConfig], dict[str, Any]] = _no_state  # its own state (GAN.pools), checkpointed
    labels: bool = True  # trains on labels (conditional models) and scores held-out reals (D's overfitting)
    domains: int = 1  # 2: trains on data.name (X) and data.target (Y)
    # G translates images of X into Y (sampled, scored, exported from images) instead of drawing samples
    # from latents (scored in the features stage's extractor, exported with a z input)
    translates: bool = False
    losses: tuple[str, ...] = ()  # its own loss statistics, summarised in metrics/train.json beside loss/D, loss/G


OBJECTIVES: dict[str, Objective] = {
    "gan": Objective(
        family="gan",
        generator_spec=models.generator_spec,
        generator=models.build_generator,
        discriminator=models.build_discriminator,
        step=steps.gan_step,
    ),
    "cyclegan": Objective(
        family="cyclegan",
        generator_spec=lambda model, shape, num_classes: cyclegan.generator_spec(model, shape),
        generator=cyclegan.build_generators,
        discriminator=lambda model, shape, num_classes: cyclegan.CycleDiscriminators(model, tuple(shape)),
        step=cyclegan.cycle_step,
        state=lambda t: {"x": cyclegan.ImagePool(t.pool_size), "y": cyclegan.ImagePool(t.pool_size)},
        labels=False,
        domains=2,
        translates=True,
        losses=("loss/cycle", "loss/identity"),
    ),
}


def objective(family: str) -> Objective:
    """The objective of `model.family` (or a generator spec's `family`)."""
    if family not in OBJECTIVES:
        raise ValueError(f"model.family: unknown family {family!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[family]


def of_spec(spec: dict[str, Any]) -> Objective:
    """The objective a saved generator was trained under (specs without a family are GANs')."""
    return objective(spec.get("family") or "gan")


def build_generator(spec: dict[str, Any]) -> nn.Module:
    """G from a generator's spec (saved in every checkpoint; specs without a family are GANs')."""
    return of_spec(spec).generator(spec)


def build_discriminator(
    model: ModelConfig, sample_shape: list[int] | tuple[int, ...], num_classes: int | None = None
) -> nn.Module:
    return objective(model.family).discriminator(model, tuple(sample_shape), num_classes)
