"""compare.py on experiment folders written by hand: the config differences, the chains,
and the paired per-image interval that says whether a difference is real."""

from __future__ import annotations

import numpy as np
import yaml

import compare
from chain.decisions import Rule, bootstrap_gain
from core.metrics import scores_from_stats
from data.atomic import write_json


def per_image_stats(scores: list[float]) -> np.ndarray:
    """Stats whose per-image competition score is `scores[i]` (see tests/test_decisions)."""
    out = np.zeros((len(scores), 3, 3), np.int64)
    for i, x in enumerate(scores):
        out[i, 0] = [round(50 * (2 * x - 1)), 50, 50]
        out[i, 2] = out[i, 0]
    return out


def experiment(root, name, epochs, scores, ids=None, seconds=600.0):
    exp = root / name
    ids = ids or [f"img{i:03d}" for i in range(len(scores))]
    stats = per_image_stats(scores)
    chain = scores_from_stats(stats)
    cfg = {"experiment": name, "out_dir": str(root), "train": {"epochs": epochs, "lr": 0.01}}
    exp.mkdir(parents=True)
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_json(
        exp / "ensemble" / "weights.json",
        {
            "models": ["a", "b"],
            "scores": {"a": {"all": {"competition": 0.7}}, "b": {"all": {"competition": 0.8}}},
            "chosen": "equal",
            "decision": None,
        },
    )
    write_json(
        exp / "postprocess.json",
        {
            "decide": {"metric": "competition"},
            "chosen": "blend, tuned",
            "source": "blend",
            "image_ids": ids,
            "oos_image_stats": stats.reshape(len(ids), -1).tolist(),
            "out_of_sample": {"blend, tuned": chain},
            "scores": {"tuned": {"competition": chain["competition"] + 0.01}},
        },
    )
    write_json(exp / "timings.json", {"train (parallel)": seconds, "tune": 30.0})
    return exp


def test_compare_prints_the_experiments_and_paired_intervals(tmp_path, capsys):
    base = list(np.linspace(0.6, 0.95, 60))
    a = experiment(tmp_path, "a", 24, base)
    b = experiment(tmp_path, "b", 32, [s + 0.03 for s in base], ids=None)  # clearly better
    noisy = [*base]
    noisy[0] += 0.3  # one image explains the whole gain
    c = experiment(tmp_path, "c", 24, noisy)
    # another data set: the same count of images, other ids
    d = experiment(tmp_path, "d", 24, base, ids=[f"x{i}" for i in range(60)])
    assert compare.main([str(p) for p in (a, b, c, d)]) == 0
    out = capsys.readouterr().out
    experiments = out.split("Submitted chains")[0].splitlines()[2:]
    lines = {line.split()[0]: line for line in experiments if line.strip()}
    assert "train.epochs: 24 -> 32" in lines["b"] and "10.5 min" in lines["b"]
    pairs = {
        line.strip().split("  ")[0]: line
        for line in out.split("second - first)")[1].splitlines()[2:]
    }
    assert "real" in pairs["b - a"] and "within the noise" in pairs["c - a"]
    assert "not comparable: different images" in pairs["d - a"]
    # the printed interval is the paired bootstrap of the two chains' per-image stats
    g = bootstrap_gain(per_image_stats(base), per_image_stats(noisy), Rule.default())
    assert f"[{g['low']:+.4f}, {g['high']:+.4f}]" in pairs["c - a"]


def test_a_folder_that_is_no_finished_experiment_is_named(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
