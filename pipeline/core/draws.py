"""Random draws keyed by (seed, step, phase), made on the CPU and staged to the device in one copy.

Every random number of a training step comes from a torch generator seeded by (seed, step, phase),
on the CPU, so the values are the same on every device and every worker count. Moving each draw to
a GPU with a blocking `.to(device)` would make the host wait for the GPU about 3 times a plain step
(about 40 with ADA). `StepDraws` removes the waits without changing a single value: it records what
a step drew (which phases, which calls, in which order), and from the next step on draws all of that
up front into one pinned float64 buffer, copied to the device with one non-blocking transfer; each
draw is then a view of it, cast back to its dtype (float32 and int64 values below 2**53 survive
float64 exactly). A step that draws something else than the step before falls back, from the first
difference on, to drawing directly: the values are the same either way.
"""

from __future__ import annotations

from typing import Any

import torch

_KINDS = ("rand", "randn", "randint")


PHASES = 64  # the first key space of a step: phase in [0, 64)
EXTRA_PHASES = 8 * 1024  # critic steps past the first space (train.n_critic > 7) continue in a second
PER_CRITIC_STEP = 8  # the k-th critic step draws from phases 8k + (the offsets below)


class Phase:
    """The named random streams of a training step (the `phase` of `step_generator`).

    Critic step k of a GAN: `critic(k, REALS)` the real batch (and its labels), `LATENTS` the z of its
    fakes, `INTERPOLATION` the mixing weights of WGAN-GP's penalty, `AUGMENT_REAL` / `AUGMENT_FAKE`
    the augmentation of each. Critic step k of a CycleGAN: `REALS` / `REALS_B` the two domains'
    batches, `POOL_X` / `POOL_Y` the history pools' draws, `PENALTY_X` (+1 for D_Y) the penalties'.
    The generator step: `G_LABELS`, `G_AUGMENT`, `G_LATENTS`. Critic phases that would reach the
    generator's (8k + offset >= 61) move to the second key space (phase >= PHASES).
    """

    REALS, LATENTS, INTERPOLATION, AUGMENT_REAL, AUGMENT_FAKE = 0, 1, 2, 3, 4
    REALS_B, POOL_X, POOL_Y, PENALTY_X = 1, 2, 3, 4  # CycleGAN (PENALTY_X + 1: D_Y's)
    G_LABELS, G_AUGMENT, G_LATENTS = 61, 62, 63
    MAX_CRITIC_STEPS = 1024

    @staticmethod
    def critic(k: int, offset: int) -> int:
        p = PER_CRITIC_STEP * k + offset
        return p if p < Phase.G_LABELS else PHASES + p - Phase.G_LABELS


def step_generator(seed: int, step: int, phase: int) -> torch.Generator:
    """A generator keyed by (seed, step, phase), distinct for every key (seed >= 0, step < 1,000,003).

    Phases below PHASES: the seed (seed * 1,000,003 + step) * 64 + phase. Phases from PHASES on
    (critic steps past the seventh): negative seeds, which torch maps to 2**64 - 1 - x, above every
    seed of the first space. A phase outside both spaces would reuse another step's draws: refused."""
    base = seed * 1_000_003 + step
    if 0 <= phase < PHASES:
        return torch.Generator().manual_seed(base * PHASES + phase)
    if PHASES <= phase < PHASES + EXTRA_PHASES:
        return torch.Generator().manual_seed(-1 - (base * EXTRA_PHASES + phase - PHASES))
    raise ValueError(f"phase {phase} outside [0, {PHASES + EXTRA_PHASES}): it would reuse another step's draws")


def _draw(g: torch.Generator, kind: str, args: tuple) -> torch.Tensor:
    if kind == "randint":
        low, high, shape = args
        return torch.randint(low, high, shape, generator=g)
    return getattr(torch, kind)(*args, generator=g)


class Stream:
    """The draws of one (seed, step, phase), in call order, like a fresh generator's: `rand(*shape)`,
    `randn(*shape)` (float32), `randint(low, high, shape)` (int64). Results are on `device`; with
    `host=True` on the CPU (to index data kept in host memory)."""

    def __init__(self, owner: "StepDraws", step: int, phase: int, served: list | None):
        self.owner, self.step, self.phase = owner, step, phase
        self.served = served  # [(kind, args, host tensor, device tensor)] prefetched for this stream, or None
        self.calls: list[tuple[str, tuple]] = []
        self.g: torch.Generator | None = None  # set once drawing directly

    def rand(self, *shape: int, host: bool = False) -> torch.Tensor:
        return self._get("rand", tuple(shape), host)

    def randn(self, *shape: int, host: bool = False) -> torch.Tensor:
        return self._get("randn", tuple(shape), host)

    def randint(self, low: int, high: int, shape: tuple[int, ...], host: bool = False) -> torch.Tensor:
        return self._get("randint", (low, high, tuple(shape)), host)

    def _get(self, kind: str, args: tuple, host: bool) -> torch.Tensor:
        i = len(self.calls)
        self.calls.append((kind, args))
        if self.g is None and self.served is not None and i < len(self.served) and self.served[i][:2] == (kind, args):
            return self.served[i][2 if host else 3]
        if self.g is None:  # first difference from the plan: replay the calls before it, then draw directly
            self.g = step_generator(self.owner.seed, self.step, self.phase)
            for k, a in self.calls[:-1]:
                _draw(self.g, k, a)
        t = _draw(self.g, kind, args)
        self.owner.direct += 1
        return t if host else t.to(self.owner.device)


class StepDraws:
    """Hands out `Stream`s for (step, phase); after `begin(step)`, served from one staged buffer."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", buffer: bool | None = None):
        self.seed, self.device = seed, torch.device(device)
        self.pin = self.device.type == "cuda"
        # one float64 buffer copied to the device; on the CPU the draws are served as drawn (there is
        # no copy to save), unless `buffer` asks for the device path (the tests prove it on the CPU)
        self.buffer = self.device.type != "cpu" if buffer is None else buffer
        self._step: int | None = None
        self._plan: list[tuple[int, list[tuple[str, tuple]]]] = []  # the last step's streams and calls
        self._streams: list[Stream] = []
        self._served: list[list] = []
        self.direct = 0  # draws made outside the staged buffer (each one a host-device wait on a GPU)

    def begin(self, step: int) -> None:
        """Start `step`: draw what the previous step drew (same phases and calls), stage it in one copy."""
        if self._streams:
            self._plan = [(s.phase, list(s.calls)) for s in self._streams]
        self._step, self._streams, self._served = step, [], []
        host = []
        for phase, calls in self._plan:
            g = step_generator(self.seed, step, phase)
            host.append([(kind, args, _draw(g, kind, args)) for kind, args in calls])
        flat = [t for stream in host for _, _, t in stream]
        if not flat:
            return
        if not self.buffer:
            self._served = [[(kind, args, t, t) for kind, args, t in stream] for stream in host]
            return
        buf = torch.empty(sum(t.numel() for t in flat), dtype=torch.float64, pin_memory=self.pin)
        torch.cat([t.reshape(-1).to(torch.float64) for t in flat], out=buf)
        staged = buf.to(self.device, non_blocking=True)  # one copy
        offset = 0
        for stream in host:
            served = []
            for kind, args, t in stream:
                on_device = staged[offset : offset + t.numel()].view(t.shape).to(t.dtype)
                served.append((kind, args, t, on_device))
                offset += t.numel()
            self._served.append(served)

    def stream(self, step: int, phase: int) -> Stream:
        i = len(self._streams) if step == self._step else None
        served = None
        if i is not None and i < len(self._served) and self._plan[i][0] == phase:
            served = self._served[i]
        s = Stream(self, step, phase, served)
        if step == self._step:
            self._streams.append(s)
        return s

    def stats(self) -> dict[str, Any]:
        """What the last step drew: streams and values (for the GPU check's report)."""
        return {
            "streams": len(self._plan),
            "values": sum(_numel(a) for _, calls in self._plan for _, a in calls),
            "direct_draws": self.direct,
        }


def _numel(args: tuple) -> int:
    shape = args[2] if len(args) == 3 and isinstance(args[2], tuple) else args
    n = 1
    for d in shape:
        n *= int(d)
    return n
