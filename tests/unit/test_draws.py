"""pipeline.draws: the named random streams of a step never share a generator."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, build_config
from pipeline.draws import PHASES, Phase, step_generator


def _phases(n_critic: int, cyclegan: bool) -> list[int]:
    """Every phase a step draws from, as the loop asks for them (pipeline.training)."""
    per_step = (
        (Phase.REALS, Phase.REALS_B, Phase.POOL_X, Phase.POOL_Y, Phase.PENALTY_X, Phase.PENALTY_X + 1)
        if cyclegan
        else (Phase.REALS, Phase.LATENTS, Phase.INTERPOLATION, Phase.AUGMENT_REAL, Phase.AUGMENT_FAKE)
    )
    critic = [Phase.critic(k, o) for k in range(n_critic) for o in per_step]
    return critic + [Phase.G_LABELS, Phase.G_AUGMENT, Phase.G_LATENTS]


@pytest.mark.parametrize("cyclegan", [False, True])
def test_the_streams_of_the_longest_step_are_distinct_and_in_range(cyclegan):
    phases = _phases(Phase.MAX_CRITIC_STEPS, cyclegan)
    assert len(set(phases)) == len(phases) and all(0 <= p < PHASES for p in phases)


def test_one_more_critic_step_would_reuse_the_generators_stream():
    longer = _phases(Phase.MAX_CRITIC_STEPS + 1, cyclegan=True)  # CycleGAN's 8th: 8 * 7 + 5 = 61
    assert len(set(longer)) < len(longer)


def test_neighbouring_steps_never_share_a_generator():
    first = [step_generator(0, 5, p).initial_seed() for p in range(PHASES)]
    nxt = [step_generator(0, 6, p).initial_seed() for p in range(PHASES)]
    assert len(set(first) | set(nxt)) == 2 * PHASES
    with pytest.raises(ValueError, match="reuse another step's draws"):
        step_generator(0, 5, PHASES)  # would be step 6's phase 0


def test_a_step_generator_is_a_pure_function_of_its_key():
    a, b = step_generator(3, 10, Phase.LATENTS), step_generator(3, 10, Phase.LATENTS)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))


def test_more_critic_steps_than_the_streams_allow_are_refused_by_name():
    assert build_config({"train": {"n_critic": Phase.MAX_CRITIC_STEPS}}).train.n_critic == 7
    with pytest.raises(ConfigError, match="train.n_critic"):
        build_config({"train": {"n_critic": Phase.MAX_CRITIC_STEPS + 1}})
