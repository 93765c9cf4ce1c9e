"""The stability monitor: the signals of a GAN run in, verdicts out. Pure Python, no torch, Ray or MLflow.

Every `train.monitor.every` steps the training loop hands `Monitor.observe` the means of its step
statistics over those steps, reduced across workers (so every worker reaches the same verdict and
takes the same action), the last in-training evaluation, and the distance between the EMA and the
raw generator. The signals (`SIGNALS`) and what each verdict reads of them:

- `diverged`: a non-finite value, or a gradient norm of D or G (`grad/D`, `grad/G`) far above its
  running median (`explode` times), the weights `blowup` times their norm at the first tick, or
  growing geometrically over `growth_ticks` ticks: the
  spiral of simultaneous gradient descent-ascent on a bilinear game, a learning rate too high.
- `vanishing_g_gradient`: the generator's gradient at its fakes collapses while D rejects them: the
  loss's slope at the fakes' scores (`grad/G_scores`, |d loss / d score| per sample) under
  `vanish`, or the input gradient (`grad/G_fakes`) under `vanish` times its peak. The saturating
  minimax loss: log(1 - D(G(z))) has slope D(G(z)) -> 0 when D wins.
- `mode_collapse`: the fakes' spread across a batch (`fake/spread`, their per-dimension standard
  deviation over the reals') under `collapse_spread`, or the live evaluation's mode or class-mode
  coverage falling to `coverage_drop` of its best so far.
- `d_overfit`: D sure of the reals it trains on, r_t = E[sign(D(x) - decision)] > `overfit_target`
  (ADA's heuristic), while it still rejects most fakes. Not read for Wasserstein critics (their
  offset is arbitrary).
- `oscillating`: the players chase each other instead of converging: D's margin between reals and
  fakes (`D/acc_real - (1 - D/acc_fake)`) flips sign again and again with a large amplitude, or the
  raw generator orbits far from its average (`ema/distance` above `orbit`).

A condition counts once it holds for `patience` consecutive ticks (a non-finite value at once);
trend rules wait `warmup` ticks. Each verdict is recorded once, at the step it was first seen, with
its evidence and a one-line explanation; `rollback` events (the loop's action) join the list.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

PROBLEMS = ("diverged", "mode_collapse", "vanishing_g_gradient", "d_overfit", "oscillating", "hidden_information")
VERDICTS = ("healthy", *PROBLEMS)
SEVERE = ("diverged", "mode_collapse")  # what a sweep stops a trial for and never picks as best

EXPLAIN = {
    "healthy": "no instability seen",
    "diverged": "the training blew up: gradients (or losses) grew without bound or became NaN",
    "mode_collapse": "the generator lost its variety: its samples cover few of the data's modes",
    "vanishing_g_gradient": "the discriminator wins so clearly that the generator's gradient vanished "
    "(the saturating minimax loss does this; the non-saturating loss does not)",
    "d_overfit": "the discriminator memorises the training reals (r_t above target): augment the data "
    "(train.augment: ada or diffaugment), add R1 or use fewer critic steps",
    "oscillating": "the players circle each other instead of converging: lower the learning rates, use "
    "alternating updates or an EMA of the generator",
    "hidden_information": "the CycleGAN pair hides its input in low-amplitude noise to pass the cycle loss",
    "rollback": "training returned to its last healthy state with lower learning rates",
}

SIGNALS = (
    "loss/D",
    "loss/G",
    "D/acc_real",
    "D/acc_fake",
    "grad/D",
    "grad/G",
    "grad/G_fakes",
    "grad/G_scores",
    "fake/spread",
    "ada/r_t",
    "ema/distance",
    "weights/G",
    "weights/D",
    "D/r_train",
    "D/r_heldout",
)


@dataclass(frozen=True)
class Thresholds:
    patience: int = 3  # consecutive ticks a condition must hold
    warmup: int = 4  # ticks before the trend rules (explosion, growth, collapse by spread) read anything
    explode: float = 1000.0  # a gradient norm or a loss this many times its running median
    growth: float = 2.0  # the weights' norm this many times larger than `growth_ticks` ticks ago, rising every tick
    growth_ticks: int = 6
    blowup: float = 1000.0  # ... or this many times its norm at the first tick
    vanish: float = 0.05  # |d loss / d score| under this (D(G(z)) < 5% under minimax), or the input
    #                      gradient under this times its peak
    rejects: float = 0.95  # D rejects at least this share of fakes (vanishing gradient)
    sure: float = 0.99  # without held-out reals: D rejects this share of fakes (overfitting)
    collapse_spread: float = 0.05  # fakes' batch spread under this share of the reals'
    coverage_drop: float = 0.5  # mode / class-mode coverage at most this share of its best so far
    overfit_target: float = 0.6  # r_t above this (ADA's target)
    overfit_gap: float = 0.3  # ... and r_t on held-out reals this much lower
    flips: int = 4  # sign changes of D's margin within `flip_ticks` ticks
    flip_ticks: int = 8
    flip_amplitude: float = 0.3  # ... each swing at least this large (accuracy units)
    orbit: float = 0.5  # ema/distance: the raw generator this far (relative to its norm) from its average


@dataclass
class Monitor:
    """Feed it with `observe`; `report()` is what goes to diagnostics.json. `state_dict` /
    `load_state_dict` carry it through checkpoints, so a resumed run judges as the uninterrupted one."""

    decision: bool = True  # the loss has a decision threshold (not a Wasserstein critic)
    thresholds: Thresholds = field(default_factory=Thresholds)
    ticks: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)  # signal -> its last values (bounded)
    peaks: dict[str, float] = field(default_factory=dict)
    streaks: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)

    KEEP = 64  # ticks of history kept per signal

    # ---- public -------------------------------------------------------------------------------

    def observe(self, step: int, signals: dict[str, float], evals: dict[str, float] | None = None) -> list[dict]:
        """Judge one tick; returns the new events (each verdict is recorded once)."""
        self.ticks += 1
        found = self._judge(signals, evals or {})
        self.last = {k: float(v) for k, v in signals.items() if k in SIGNALS}
        for k, v in self.last.items():
            if math.isfinite(v):
                self.history.setdefault(k, []).append(v)
                del self.history[k][: -self.KEEP]
                self.peaks[k] = max(self.peaks.get(k, v), v)
        for cov in _coverage(evals or {}):
            self.peaks[cov] = max(self.peaks.get(cov, 0.0), float(evals[cov]))
        new = []
        for kind, evidence in found.items():
            if kind not in self.seen:
                new.append(self.record(kind, step, evidence))
        return new

    def record(self, kind: str, step: int, evidence: dict[str, Any]) -> dict[str, Any]:
        event = {"kind": kind, "step": int(step), "evidence": _plain(evidence), "explanation": EXPLAIN[kind]}
        self.events.append(event)
        return event

    @property
    def seen(self) -> set[str]:
        """Verdicts already recorded; `diverged` only since the last rollback (it can recur after one)."""
        last = max((i for i, e in enumerate(self.events) if e["kind"] == "rollback"), default=-1)
        return {e["kind"] for i, e in enumerate(self.events) if i > last or e["kind"] != "diverged"}

    @property
    def verdict(self) -> str:
        """`healthy`, or the first problem found."""
        return next((e["kind"] for e in self.events if e["kind"] in PROBLEMS), "healthy")

    def rolled_back(self, step: int, to_step: int, evidence: dict[str, Any]) -> dict[str, Any]:
        """Record a rollback from `step` to `to_step`; the trends start again from there."""
        self.history, self.streaks, self.peaks, self.ticks = {}, {}, {}, 0  # the warm-up too
        return self.record("rollback", step, {"to_step": int(to_step), **evidence})

    @property
    def severe(self) -> list[str]:
        """The severe problems (SEVERE) that stand: a collapse, or a divergence no rollback followed.
        A sweep stops such a trial and never picks it as best."""
        out = []
        for i, e in enumerate(self.events):
            later = self.events[i + 1 :]
            recovered = e["kind"] == "diverged" and any(x["kind"] == "rollback" for x in later)
            if e["kind"] in SEVERE and not recovered and e["kind"] not in out:
                out.append(e["kind"])
        return out

    def report(self) -> dict[str, Any]:
        verdict = self.verdict
        return {
            "verdict": verdict,
            "explanation": EXPLAIN[verdict],
            "problems": sorted({e["kind"] for e in self.events} & set(PROBLEMS)),
            "severe": self.severe,
            "rollbacks": sum(e["kind"] == "rollback" for e in self.events),
            "events": list(self.events),
            "signals": _plain(dict(self.last)),  # a NaN as the string "nan": diagnostics.json stays JSON
            "thresholds": asdict(self.thresholds),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "history": {k: list(v) for k, v in self.history.items()},
            "peaks": dict(self.peaks),
            "streaks": dict(self.streaks),
            "events": list(self.events),
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ticks = int(state.get("ticks", 0))
        self.history = {k: [float(x) for x in v] for k, v in state.get("history", {}).items()}
        self.peaks = {k: float(v) for k, v in state.get("peaks", {}).items()}
        self.streaks = {k: int(v) for k, v in state.get("streaks", {}).items()}
        self.events = list(state.get("events", []))
        self.last = {k: float(v) for k, v in state.get("last", {}).items()}

    # ---- the rules ----------------------------------------------------------------------------

    def _judge(self, s: dict[str, float], evals: dict[str, float]) -> dict[str, dict[str, Any]]:
        th, found = self.thresholds, {}
        bad = sorted(k for k, v in s.items() if not math.isfinite(float(v)))
        if bad:
            found["diverged"] = {"non_finite": bad, **{k: float(s[k]) for k in bad}}
        conditions = {
            "diverged": self._explosion(s),
            "vanishing_g_gradient": self._vanishing(s),
            "mode_collapse": self._collapse(s, evals),
            "d_overfit": self._overfit(s),
            "oscillating": self._oscillation(s),
        }
        for kind, evidence in conditions.items():
            held = self.streaks.get(kind, 0) + 1 if evidence else 0
            self.streaks[kind] = held
            if evidence and held >= th.patience and kind not in found:
                found[kind] = {**evidence, "ticks": held}
        if evals.get("hidden_information"):
            found["hidden_information"] = {k: v for k, v in evals.items() if "gain" in k or "hidden" in k}
        return found

    def _explosion(self, s: dict[str, float]) -> dict[str, Any] | None:
        th = self.thresholds
        if "weights/G" in s and "weights/D" in s and "weights/first" not in self.peaks:
            self.peaks["weights/first"] = math.hypot(s["weights/G"], s["weights/D"])
        blown = self._blowup(s) if self.ticks > 1 else None
        if blown or self.ticks <= th.warmup:
            return blown
        for key in ("grad/D", "grad/G", "loss/D", "loss/G"):
            v, past = s.get(key), [abs(x) for x in self.history.get(key, [])]
            if v is None or len(past) < th.warmup:
                continue
            median = statistics.median(past)
            if median > 0 and abs(v) > th.explode * median:
                return {key: v, "running_median": median, "ratio": abs(v) / median}
        # geometric growth of all the weights (both players together): the spiral of simultaneous
        # gradient descent-ascent, where each player's own norm rises and falls as they rotate
        if "weights/G" in s and "weights/D" in s:
            v = math.hypot(s["weights/G"], s["weights/D"])
            past = [
                math.hypot(g, d) for g, d in zip(self.history.get("weights/G", []), self.history.get("weights/D", []))
            ]
            window = past[-th.growth_ticks :] + [v]
            rising = all(b > a for a, b in zip(window, window[1:]))
            if len(window) > th.growth_ticks and rising and window[0] > 0 and v > th.growth * window[0]:
                return {"weights": v, f"{th.growth_ticks}_ticks_ago": window[0], "ratio": v / window[0]}
        return None

    def _blowup(self, s: dict[str, float]) -> dict[str, Any] | None:
        """The weights (both players) `blowup` times their norm at the first tick: a blow-up, even one
        over before the warm-up ends (the running median would take it as the norm)."""
        if "weights/G" not in s or "weights/D" not in s:
            return None
        v, first = math.hypot(s["weights/G"], s["weights/D"]), self.peaks.get("weights/first", 0.0)
        if first > 0 and math.isfinite(v) and v > self.thresholds.blowup * first:
            return {"weights": v, "at_first_tick": first, "ratio": v / first}
        return None

    def _vanishing(self, s: dict[str, float]) -> dict[str, Any] | None:
        th = self.thresholds
        rejects = s.get("D/acc_fake")
        if rejects is None or rejects < th.rejects:
            return None
        slope = s.get("grad/G_scores")
        if slope is not None and slope < th.vanish:
            return {"grad/G_scores": slope, "D/acc_fake": rejects}
        at, peak = s.get("grad/G_fakes"), self.peaks.get("grad/G_fakes")
        if at is not None and peak and at < th.vanish * peak:
            return {"grad/G_fakes": at, "peak": peak, "D/acc_fake": rejects}
        return None

    def _collapse(self, s: dict[str, float], evals: dict[str, float]) -> dict[str, Any] | None:
        th = self.thresholds
        spread = s.get("fake/spread")
        # a generator whose gradient vanished never spread out: that is the other verdict
        stuck = self._vanishing(s) is not None
        if spread is not None and self.ticks > th.warmup and spread < th.collapse_spread and not stuck:
            return {"fake/spread": spread}
        for cov in _coverage(evals):
            best = self.peaks.get(cov, 0.0)
            if best > 0 and float(evals[cov]) <= th.coverage_drop * best:
                return {cov: float(evals[cov]), "best_so_far": best}
        return None

    def _overfit(self, s: dict[str, float]) -> dict[str, Any] | None:
        th = self.thresholds
        if not self.decision:
            return None
        if "D/r_heldout" in s and "D/r_train" in s:  # the direct measure: reals D trained on vs reals it never saw
            r_t, gap = s["D/r_train"], s["D/r_train"] - s["D/r_heldout"]
            if r_t > th.overfit_target and gap > th.overfit_gap:
                return {"r_t": r_t, "r_heldout": s["D/r_heldout"], "gap": gap, "target": th.overfit_target}
            return None
        if "D/acc_real" not in s:
            return None
        r_t = s.get("ada/r_t", 2 * s["D/acc_real"] - 1)  # ADA's heuristic alone: D sure of reals, rejecting fakes
        if r_t > th.overfit_target and s.get("D/acc_fake", 0.0) >= th.sure:
            return {"r_t": r_t, "target": th.overfit_target, "D/acc_fake": s["D/acc_fake"]}
        return None

    def _oscillation(self, s: dict[str, float]) -> dict[str, Any] | None:
        th = self.thresholds
        if "D/acc_real" in s and "D/acc_fake" in s:
            margins = self.history.get("margin", []) + [s["D/acc_real"] + s["D/acc_fake"] - 1]
            # kept beside the signals, so it is trimmed and restored with them
            self.history["margin"] = margins[-self.KEEP :]
            recent = margins[-th.flip_ticks :]
            swings = [b - a for a, b in zip(recent, recent[1:])]
            flips = sum(1 for a, b in zip(swings, swings[1:]) if a * b < 0 and abs(b) >= th.flip_amplitude)
            if flips >= th.flips:
                return {"margin_flips": flips, "window_ticks": len(recent), "amplitude": max(map(abs, swings))}
        d = s.get("ema/distance")
        if d is not None and self.ticks > th.warmup and d > th.orbit:
            return {"ema/distance": d, "orbit": th.orbit}
        return None


def tags(report: dict[str, Any]) -> dict[str, str]:
    """A report as MLflow tags (the run list filters on them): the verdict, the rollbacks, and the step
    each kind of event was first seen at."""
    out = {"ganpipe.diagnosis": report["verdict"], "ganpipe.diagnosis.rollbacks": str(report["rollbacks"])}
    for e in report["events"]:
        out.setdefault(f"ganpipe.diagnosis.{e['kind']}", f"step {e['step']}")
    return out


def describe(event: dict[str, Any]) -> str:
    """One line for a person: the step, the verdict, what it means and the evidence."""
    evidence = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.get("evidence", {}).items()
    )
    return f"step {event['step']}: {event['kind']}: {EXPLAIN.get(event['kind'], '')} ({evidence})"


def _coverage(evals: dict[str, float]) -> list[str]:
    return [k for k in ("modes", "class_modes") if isinstance(evals.get(k), (int, float))]


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    return x
