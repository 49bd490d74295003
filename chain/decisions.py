"""Every tuned choice judged out of sample, and kept only when it beats the simple ones.

A choice fitted on the out-of-fold maps (blend weights, the refiner, post-processing
parameters) always scores well on the maps it was fitted on; that score says nothing about
new images. So each choice is made by nested cross-validation on the shared split: for
fold k it is fitted on the other folds' images and scored on fold k's, which gives every
image a score from parameters that never saw it (`cross_fit`). The final parameters are
then fitted on all folds, and their in-sample score is reported beside the honest one.
`decide` does the three steps for every stage: cross-fit each `Option`, fit it on all
folds, and `choose` among them; a stage only says what its options fit and how they score.

The decision itself (`choose`) prefers the simple alternatives (equal weights, the best
single model, no refinement, plain argmax or the region vote alone): the best of them on
the out-of-sample metric is the default, and each more complex candidate (one more fitted
component per level) replaces the current choice only if the paired per-image bootstrap
interval of its gain over it lies above zero. With 100-odd images the difference between
two reasonable choices is mostly noise, and a coin toss must not decide the submission.
The level's best is picked among its candidates on the same scores, so its gain is
flattered by the pick; `Rule.adjust` (Bonferroni by default) widens its interval for the
number of candidates it was picked from.

`Rule` is the config's `decide:` section; `lens` is what a map is judged after: plain
argmax, or the one-class-per-region vote that post-processing almost always applies (a
stray pixel of the other class inside a polyp is then not held against a blend that
post-processing would fix anyway).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from joblib import effective_n_jobs

from chain.postprocessing import PostprocessParams, postprocess
from core.metrics import scores_from_stats, stats_in_chunks
from core.settings import LENS_NAMES, DecideSettings

P = TypeVar("P")

# What a map is judged after (Rule.lens).
LENSES = dict(
    zip(LENS_NAMES, (PostprocessParams(), PostprocessParams(region_mode="prob")), strict=True)
)
SCORE_KEYS = (
    "competition",
    "competition_neo",
    "competition_non",
    "dice_seg",
    "dice_neo",
    "dice_non",
)


@dataclass(frozen=True)
class Rule(DecideSettings):
    """How a decision is made: the config's `decide:` section, and what it judges after."""

    @property
    def params(self) -> PostprocessParams:
        """The post-processing a map is judged after."""
        return LENSES[self.lens]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tail(self, picked_from: int = 1) -> float:
        """The probability left below the interval's lower end, for the best of `picked_from`."""
        tail = (1.0 - self.confidence) / 2.0
        return tail / picked_from if self.adjust == "bonferroni" else tail


def map_stats(
    probs: np.ndarray,
    targets: np.ndarray,
    params: PostprocessParams,
    n_jobs: int = 1,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Per-image class stats of post-processed (N, 3, H, W) maps against (N, H, W) class
    maps of the same size, for `rows` (default all).

    Images are split into one chunk per thread; OpenCV and numpy release the GIL.
    """
    if probs.shape[0] != targets.shape[0] or probs.shape[2:] != targets.shape[1:]:
        raise ValueError(f"probs {probs.shape} do not match targets {targets.shape}")
    rows = np.arange(len(probs)) if rows is None else np.asarray(rows)
    size = targets.shape[1:]
    chunk = math.ceil(len(rows) / (4 * effective_n_jobs(n_jobs)))
    return stats_in_chunks(
        lambda lo, hi: np.stack([postprocess(probs[i], size, params) for i in rows[lo:hi]]),
        targets[rows],
        chunk,
        n_jobs,
    )


def pick(stats: np.ndarray) -> dict[str, float]:
    scores = scores_from_stats(stats)
    return {k: scores[k] for k in SCORE_KEYS}


def fold_rows(folds: Sequence[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(k, rows outside fold k, rows of fold k) for every fold, in fold order."""
    f = np.asarray(folds)
    return [(int(k), np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in np.unique(f)]


def cross_fit(
    folds: Sequence[int],
    fit: Callable[[int | None, np.ndarray], P],
    stats: Callable[[P, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, dict[int, P]]:
    """Out-of-sample per-image stats (N, 3, 3) and the parameters fitted for each fold.

    `fit(k, rows)` fits on `rows` (every image outside fold k); `stats(params, rows)`
    scores `rows` (fold k's images) with them. No image is scored by parameters whose
    fit saw it.
    """
    out = np.zeros((len(folds), 3, 3), np.int64)
    fitted: dict[int, P] = {}
    for k, train, held in fold_rows(folds):
        if np.intersect1d(train, held).size:
            raise RuntimeError(f"fold {k}: an image is both fitted on and scored")
        fitted[k] = fit(k, train)
        out[held] = stats(fitted[k], held)
    return out, fitted


def bootstrap_gain(
    base: np.ndarray, other: np.ndarray, rule: Rule, picked_from: int = 1
) -> dict[str, float]:
    """`other`'s gain over `base` on the rule's metric, with its paired bootstrap interval.

    Both are per-image stats of the same images; each resample draws images with
    replacement and scores both systems on the same draw, so what the images have in
    common (hard ones, easy ones) cancels. Seeded: the same inputs give the same interval.
    `other` picked as the best of `picked_from` candidates gets the rule's wider interval.
    """
    if base.shape != other.shape:
        raise ValueError(f"stats of different image sets: {base.shape} vs {other.shape}")
    n = len(base)
    rng = np.random.default_rng(rule.seed)
    gain = _metric(other, rule.metric) - _metric(base, rule.metric)
    draws = np.empty(rule.n_boot)
    for b in range(rule.n_boot):
        idx = rng.integers(0, n, n)
        draws[b] = _metric(other[idx], rule.metric) - _metric(base[idx], rule.metric)
    tail = rule.tail(picked_from) * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return {"gain": float(gain), "low": float(low), "high": float(high)}


def _metric(stats: np.ndarray, metric: str) -> float:
    return scores_from_stats(stats)[metric]


@dataclass
class Candidate:
    """One way to make a choice: its out-of-sample stats and how much it fits.

    `level` 0 is a simple alternative (nothing fitted, or a pick between a few
    things); each level above adds a fitted component, and has to pay for it.
    `insample` holds the stats of the all-folds fit on the same images (None for a
    candidate with nothing to fit, whose two scores are the same).
    """

    name: str
    oos: np.ndarray
    level: int = 0
    insample: np.ndarray | None = None


def _best(candidates: Sequence[Candidate], pool: Sequence[Candidate], metric: str) -> Candidate:
    """The best of `pool` on the metric; ties to the one listed first in `candidates`."""
    return max(pool, key=lambda c: (_metric(c.oos, metric), -candidates.index(c)))


def choose(candidates: Sequence[Candidate], rule: Rule) -> dict[str, Any]:
    """The decision record: every candidate's scores, the steps taken, the choice and why.

    The best simple candidate (level 0) is the default. Then, level by level, the best
    candidate of the level replaces the current choice only when the lower end of the
    interval of its gain over it is above zero: every added fitted component must beat
    what it adds to by more than the noise. The interval is the rule's for the best of
    every candidate tried against the current choice so far (this level's and those of
    earlier levels that did not replace it: a level-2 candidate that scores like a
    rejected level-1 one must not pass on a narrower interval), and the reason names
    every step. The table's gains over the best simple candidate use the same count, as
    if no level had replaced it.
    """
    metric = rule.metric
    simple = [c for c in candidates if c.level == 0]
    if not simple:
        raise ValueError("a decision needs at least one simple candidate")
    default = _best(candidates, simple, metric)
    levels = sorted({c.level for c in candidates} - {0})
    per_level = {level: sum(c.level == level for c in candidates) for level in {0, *levels}}
    rows: dict[str, dict[str, Any]] = {}
    for c in candidates:
        row: dict[str, Any] = {"level": c.level, "out_of_sample": pick(c.oos)}
        if c.insample is not None:
            row["in_sample"] = pick(c.insample)
        if c is not default:
            picked_from = sum(per_level[lv] for lv in levels if lv <= c.level) or 1
            row["gain_over_simple"] = bootstrap_gain(default.oos, c.oos, rule, picked_from)
        rows[c.name] = row
    chosen, steps, tried = default, [], 0
    said = [f"{default.name} is the best simple choice out of sample"]
    for level in levels:
        best = _best(candidates, [c for c in candidates if c.level == level], metric)
        tried += per_level[level]
        g = bootstrap_gain(chosen.oos, best.oos, rule, tried)
        interval = (
            f"{g['gain']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}] "
            f"({1 - 2 * rule.tail(tried):.1%} interval)"
        )
        taken = g["low"] > 0
        steps.append(
            {"from": chosen.name, "to": best.name, **g, "picked_from": tried, "taken": taken}
        )
        if taken:
            said.append(f"{best.name} beats {chosen.name} by {interval}")
            chosen, tried = best, 0
        elif g["high"] < 0:
            said.append(f"{best.name} loses to {chosen.name} by {interval}")
        else:
            said.append(f"{best.name}'s gain over {chosen.name}, {interval}, is within the noise")
    return {
        "metric": metric,
        "lens": rule.lens,
        "confidence": rule.confidence,
        "adjust": rule.adjust,
        "candidates": rows,
        "steps": steps,
        "chosen": chosen.name,
        "reason": f"{chosen.name}: " + "; ".join(said),
    }


@dataclass(frozen=True)
class Option(Generic[P]):
    """One way to make a choice, before it is judged: how it scores images with its
    parameters (`stats(params, rows)`, per-image stats of `rows`), and either the
    parameters it always uses (`params`: nothing fitted) or how it fits them on some
    images (`fit(k, rows)`: k is the fold left out, None for the all-folds fit)."""

    name: str
    stats: Callable[[P, np.ndarray], np.ndarray]
    params: P | None = None
    fit: Callable[[int | None, np.ndarray], P] | None = None
    level: int = 0


@dataclass(frozen=True)
class Judged(Generic[P]):
    """An option after `decide`: its scores, the parameters fitted on all folds (for the
    test set) and those of each fold (each fold's images were scored with its own)."""

    candidate: Candidate
    params: P
    fold_params: dict[int, P]


@dataclass(frozen=True)
class Outcome(Generic[P]):
    """What `decide` returns: `choose`'s record, and every option judged, by name."""

    record: dict[str, Any]
    judged: dict[str, Judged[P]]

    @property
    def chosen(self) -> Judged[P]:
        return self.judged[self.record["chosen"]]


def judge(option: Option[P], folds: Sequence[int]) -> Judged[P]:
    """An option's out-of-sample scores, and its in-sample ones when it fits something.

    A fitted option is cross-fitted (each fold scored by parameters fitted on the others),
    then fitted on all folds; that fit's scores on the same images are the in-sample ones.
    An option with nothing to fit scores the same in and out of sample.
    """
    everything = np.arange(len(folds))
    if option.fit is None:
        oos = option.stats(option.params, everything)
        per_fold = {k: option.params for k, _, _ in fold_rows(folds)}
        return Judged(Candidate(option.name, oos, option.level), option.params, per_fold)
    oos, per_fold = cross_fit(folds, option.fit, option.stats)
    params = option.fit(None, everything)
    insample = option.stats(params, everything)
    return Judged(Candidate(option.name, oos, option.level, insample), params, per_fold)


def decide(options: Sequence[Option[P]], folds: Sequence[int], rule: Rule) -> Outcome[P]:
    """Judge every option on the shared split (`judge`), then `choose` among them: the one
    out-of-sample decision of every stage that fits something (blend weights, the refined
    mask, post-processing)."""
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise ValueError(f"options need distinct names, got {names}")
    judged = {o.name: judge(o, folds) for o in options}
    return Outcome(choose([j.candidate for j in judged.values()], rule), judged)


def format_decision(title: str, record: dict[str, Any]) -> str:
    """The decision as a console table: out-of-sample and in-sample scores, gain, choice."""
    metric = record["metric"]
    lines = [f"{title} (judged on out-of-sample {metric}, {record['lens']} maps)"]
    width = max(len(n) for n in record["candidates"]) + 2
    lines.append(
        f"{'':{width}s}{'level':>6s}{'out of sample':>15s}{'in sample':>12s}"
        "  gain over the best simple [interval]"
    )
    for name, row in record["candidates"].items():
        ins = row.get("in_sample", {}).get(metric)
        gain = row.get("gain_over_simple")
        text = f"{gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" if gain else ""
        mark = " <- chosen" if name == record["chosen"] else ""
        lines.append(
            f"{name:{width}s}{row['level']:6d}{row['out_of_sample'][metric]:15.4f}"
            f"{'' if ins is None else f'{ins:.4f}':>12s}  {text}{mark}"
        )
    lines.append(f"decision: {record['reason']}")
    return "\n".join(lines)
