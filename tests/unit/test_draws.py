"""pipeline.core.draws: the named random streams of a step never share a generator, whatever n_critic."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ConfigError, build_config
from pipeline.core.draws import EXTRA_PHASES, PHASES, Phase, step_generator


def _phases(n_critic: int, cyclegan: bool) -> list[int]:
    """Every phase a step draws from, as the loop asks for them (pipeline.core.training)."""
    per_step = (
        (Phase.REALS, Phase.REALS_B, Phase.POOL_X, Phase.POOL_Y, Phase.PENALTY_X, Phase.PENALTY_X + 1)
        if cyclegan
        else (Phase.REALS, Phase.LATENTS, Phase.INTERPOLATION, Phase.AUGMENT_REAL, Phase.AUGMENT_FAKE)
    )
    critic = [Phase.critic(k, o) for k in range(n_critic) for o in per_step]
    return critic + [Phase.G_LABELS, Phase.G_AUGMENT, Phase.G_LATENTS]


def _seeds(step: int, phases: list[int]) -> list[int]:
    return [step_generator(3, step, p).initial_seed() for p in phases]


@pytest.mark.parametrize("cyclegan", [False, True])
@pytest.mark.parametrize("n_critic", [1, 5, 7, 8, 30, Phase.MAX_CRITIC_STEPS])
def test_no_two_streams_of_two_neighbouring_steps_share_a_generator(cyclegan, n_critic):
    phases = _phases(n_critic, cyclegan)
    assert len(set(phases)) == len(phases)
    seeds = _seeds(10, phases) + _seeds(11, phases)
    assert len(set(seeds)) == len(seeds)


def test_the_first_seven_critic_steps_keep_their_phases():
    """Runs with n_critic <= 7 draw what they drew before the streams were named (8k + offset)."""
    assert [Phase.critic(k, o) for k in range(7) for o in range(5)] == [8 * k + o for k in range(7) for o in range(5)]
    assert step_generator(0, 5, 3).initial_seed() == (0 * 1_000_003 + 5) * 64 + 3


def test_a_phase_outside_both_key_spaces_is_refused():
    with pytest.raises(ValueError, match="reuse another step's draws"):
        step_generator(0, 5, PHASES + EXTRA_PHASES)
    with pytest.raises(ValueError, match="reuse another step's draws"):
        step_generator(0, 5, -1)


def test_a_step_generator_is_a_pure_function_of_its_key():
    a, b = step_generator(3, 10, Phase.LATENTS), step_generator(3, 10, Phase.LATENTS)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))


def test_more_critic_steps_than_the_streams_allow_are_refused_by_name():
    assert build_config({"train": {"n_critic": 25}}).train.n_critic == 25
    with pytest.raises(ConfigError, match="train.n_critic"):
        build_config({"train": {"n_critic": Phase.MAX_CRITIC_STEPS + 1}})
