"""decisions.py: nested fits that never score an image with parameters fitted on it, the
paired bootstrap, and the rule that keeps a complex choice only when it clearly wins."""

from __future__ import annotations

import numpy as np
import pytest

from chain.decisions import (
    Candidate,
    Rule,
    bootstrap_gain,
    choose,
    cross_fit,
    fold_rows,
    format_decision,
    map_stats,
)
from chain.postprocessing import PostprocessParams
from core.config import ConfigError
from core.metrics import class_stats, scores_from_stats


def stats_of(scores: list[float]) -> np.ndarray:
    """Per-image stats whose competition score per image is exactly `scores[i]`: the
    neoplastic row has Dice s (intersection s*50 of 50 + 50 pixels), the other row is
    empty in both (scores 1), so the image scores (s + 1) / 2; s = 2x - 1."""
    out = np.zeros((len(scores), 3, 3), np.int64)
    for i, x in enumerate(scores):
        s = 2 * x - 1
        out[i, 0] = [round(50 * s), 50, 50]
        out[i, 2] = out[i, 0]
    return out


def test_stats_helper_scores_what_it_says():
    values = [0.5, 0.75, 1.0]
    per_image = [scores_from_stats(stats_of([v]))["competition"] for v in values]
    assert per_image == pytest.approx(values)


def test_cross_fit_scores_each_image_with_parameters_that_never_saw_it():
    folds = [0, 1, 2, 0, 1, 2, 0, 1]
    seen: dict[int, set[int]] = {}

    def fit(k, rows):
        seen[k] = set(rows.tolist())
        return k

    def stats(k, rows):
        assert not seen[k] & set(rows.tolist())
        assert all(folds[r] == k for r in rows)
        return stats_of([0.5 + 0.1 * k] * len(rows))

    oos, fitted = cross_fit(folds, fit, stats)
    assert fitted == {0: 0, 1: 1, 2: 2}
    assert seen[0] == {1, 2, 4, 5, 7}
    expected = stats_of([0.5 + 0.1 * f for f in folds])
    np.testing.assert_array_equal(oos, expected)
    assert [k for k, _, _ in fold_rows(folds)] == [0, 1, 2]


def test_bootstrap_gain_is_zero_for_equal_systems_and_clear_for_a_consistent_winner():
    rule = Rule.default(n_boot=500)
    a = stats_of(list(np.linspace(0.5, 1.0, 40)))
    same = bootstrap_gain(a, a, rule)
    assert same == {"gain": 0.0, "low": 0.0, "high": 0.0}
    better = stats_of(list(np.linspace(0.5, 1.0, 40) * 0.9 + 0.1))  # every image better
    g = bootstrap_gain(a, better, rule)
    assert g["gain"] > 0 and g["low"] > 0 and g["low"] <= g["gain"] <= g["high"]
    assert bootstrap_gain(a, better, rule) == g  # seeded
    # one image much better, the rest a little worse: positive mean, interval spans zero
    mixed = stats_of([1.0, *(np.linspace(0.5, 1.0, 40)[1:] - 0.005)])
    m = bootstrap_gain(a, mixed, rule)
    assert m["low"] < 0 < m["high"]
    with pytest.raises(ValueError, match="different image sets"):
        bootstrap_gain(a, a[:5], rule)


def test_choose_keeps_the_complex_candidate_only_when_it_clearly_wins():
    rule = Rule.default(n_boot=500)
    base = list(np.linspace(0.5, 0.9, 30))
    equal = Candidate("equal", stats_of(base))
    weaker = Candidate("best single", stats_of([b - 0.05 for b in base]))
    clear = Candidate("tuned", stats_of([b + 0.05 for b in base]), level=1)
    record = choose([equal, weaker, clear], rule)
    assert record["chosen"] == "tuned" and "beats equal" in record["reason"]
    assert record["candidates"]["tuned"]["gain_over_simple"]["low"] > 0
    assert record["steps"] == [
        {
            "from": "equal",
            "to": "tuned",
            **bootstrap_gain(equal.oos, clear.oos, rule),
            "picked_from": 1,
            "taken": True,
        }
    ]

    lucky = [b - 0.01 for b in base]
    lucky[0] = 1.0  # one image explains the whole gain
    noisy = Candidate("tuned", stats_of(lucky), level=1, insample=stats_of([1.0] * 30))
    record = choose([equal, weaker, noisy], rule)
    assert scores_from_stats(noisy.oos)["competition"] > scores_from_stats(equal.oos)["competition"]
    assert record["chosen"] == "equal" and "within the noise" in record["reason"]
    assert record["candidates"]["tuned"]["in_sample"]["competition"] == 1.0
    text = format_decision("blend", record)
    assert "<- chosen" in text.splitlines()[2] and "within the noise" in text

    # the best simple candidate is the default; a tie goes to the one listed first
    record = choose([weaker, equal], rule)
    assert record["chosen"] == "equal" and record["steps"] == []
    twin = Candidate("twin", stats_of(base))
    assert choose([equal, twin], rule)["chosen"] == "equal"
    assert choose([twin, equal], rule)["chosen"] == "twin"
    with pytest.raises(ValueError, match="simple"):
        choose([clear], rule)


def test_each_level_must_beat_the_choice_below_it():
    rule = Rule.default(n_boot=500)
    base = list(np.linspace(0.5, 0.85, 40))
    simple = Candidate("blend, region vote", stats_of(base))
    tuned = Candidate("blend, tuned", stats_of([b + 0.05 for b in base]), level=1)
    # level 2 is the best of all, but only by a hair over level 1: not worth its refiner
    tie = [b + 0.05 for b in base]
    tie[0] += 0.02
    refined = Candidate("refined, tuned", stats_of(tie), level=2)
    record = choose([simple, tuned, refined], rule)
    assert record["chosen"] == "blend, tuned"
    assert [s["taken"] for s in record["steps"]] == [True, False]
    assert record["steps"][1]["from"] == "blend, tuned"
    # ... while a clear gain at level 2 is taken even when level 1 brought nothing
    flat = Candidate("blend, tuned", stats_of(base), level=1)
    clear = Candidate("refined, tuned", stats_of([b + 0.1 for b in base]), level=2)
    record = choose([simple, flat, clear], rule)
    assert record["chosen"] == "refined, tuned"
    assert [s["taken"] for s in record["steps"]] == [False, True]


def test_the_best_of_several_candidates_needs_a_wider_interval():
    """A level's best is picked from its candidates on the same scores, which flatters its
    gain; with Bonferroni the interval widens with their number, so a gain that clears
    zero at the plain level can fail when it was the best of three."""
    base = np.linspace(0.5, 0.9, 60)
    rng = np.random.default_rng(3)
    gains = 0.008 + rng.normal(0.0, 0.04, len(base))
    simple = Candidate("blend, region vote", stats_of(list(base)))
    rivals = [Candidate(f"rival {i}", stats_of(list(base - 0.02)), level=1) for i in range(2)]
    marginal = Candidate("blend, tuned", stats_of(list(np.clip(base + gains, 0.5, 1.0))), level=1)
    plain = Rule.default(n_boot=2000, adjust="none")
    wide = Rule.default(n_boot=2000)
    alone = bootstrap_gain(simple.oos, marginal.oos, plain)
    picked = bootstrap_gain(simple.oos, marginal.oos, wide, picked_from=3)
    assert alone["low"] > 0 > picked["low"] and picked["high"] > alone["high"]
    assert bootstrap_gain(simple.oos, marginal.oos, wide) == alone  # one candidate: the same

    assert choose([simple, marginal, *rivals], plain)["chosen"] == "blend, tuned"
    record = choose([simple, marginal, *rivals], wide)
    assert record["chosen"] == "blend, region vote"
    assert "96.7% interval" in record["reason"] and "within the noise" in record["reason"]
    assert record["candidates"]["blend, tuned"]["gain_over_simple"] == picked


def test_a_higher_level_cannot_pass_where_a_rejected_one_failed():
    """Tuned post-processing that tunes nothing scores like the refined maps at argmax; the
    level-2 copy is judged as one more candidate against the same choice, not alone."""
    base = np.linspace(0.5, 0.9, 60)
    gains = 0.008 + np.random.default_rng(3).normal(0.0, 0.04, len(base))
    marginal = stats_of(list(np.clip(base + gains, 0.5, 1.0)))
    simple = Candidate("blend, region vote", stats_of(list(base)))
    level1 = [Candidate("refined, argmax", marginal, level=1)]
    level1 += [Candidate(f"rival {i}", stats_of(list(base - 0.02)), level=1) for i in range(2)]
    copy = Candidate("refined, tuned", marginal.copy(), level=2)
    assert (
        bootstrap_gain(simple.oos, copy.oos, Rule.default(n_boot=2000))["low"] > 0
    )  # alone: passes
    record = choose([simple, *level1, copy], Rule.default(n_boot=2000))
    assert record["chosen"] == "blend, region vote"
    assert [s["picked_from"] for s in record["steps"]] == [3, 4]
    step = record["steps"][1]
    shown = record["candidates"]["refined, tuned"]["gain_over_simple"]
    assert shown == {k: step[k] for k in ("gain", "low", "high")}


def test_the_reason_names_every_step():
    rule = Rule.default(n_boot=500)
    base = list(np.linspace(0.5, 0.85, 40))
    simple = Candidate("blend, region vote", stats_of(base))
    tuned = Candidate("blend, tuned", stats_of([b + 0.05 for b in base]), level=1)
    worse = Candidate("refined, tuned", stats_of([b + 0.01 for b in base]), level=2)
    reason = choose([simple, tuned, worse], rule)["reason"]
    assert reason.startswith("blend, tuned: blend, region vote is the best simple choice")
    assert "blend, tuned beats blend, region vote by" in reason
    assert "refined, tuned loses to blend, tuned by" in reason


def test_rule_is_checked_like_any_config_section():
    assert Rule.from_config({}) == Rule.default()
    assert Rule.from_config({"decide": {"lens": "argmax"}}).params == PostprocessParams()
    assert Rule.default().params.region_mode == "prob"
    for bad, named in (
        ({"lense": "argmax"}, "lense"),
        ({"lens": "median"}, "decide.lens"),
        ({"metric": "dice"}, "decide.metric"),
        ({"confidence": 1.0}, "decide.confidence"),
        ({"adjust": "holm"}, "decide.adjust"),
        ({"n_boot": 10}, "decide.n_boot"),
    ):
        with pytest.raises(ConfigError, match=named):
            Rule.from_config({"decide": bad})


def test_map_stats_scores_the_post_processed_maps_of_the_rows_asked_for():
    targets = np.zeros((3, 16, 16), np.uint8)
    targets[:, 4:12, 4:12] = 1
    probs = np.zeros((3, 3, 16, 16), np.uint8)
    probs[:, 0] = 255
    probs[:, :, 4:12, 4:12] = [[[0]], [[150]], [[105]]]  # class 1 wins the region
    probs[1, :, 5, 5] = [0, 100, 155]  # a stray class-2 pixel inside the polyp of image 1
    stats = map_stats(probs, targets, PostprocessParams(), rows=np.array([1, 2]))
    expected = class_stats(probs[[1, 2]].argmax(axis=1).astype(np.uint8), targets[[1, 2]])
    np.testing.assert_array_equal(stats, expected)
    assert scores_from_stats(stats[:1])["competition"] < 1.0
    region = map_stats(probs, targets, Rule.default().params, n_jobs=2)
    assert scores_from_stats(region)["competition"] == 1.0  # the vote removes the stray pixel
