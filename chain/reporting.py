"""A self-contained HTML report of an experiment that a competitor can trust at a glance.

Every score is shown against what predicting nothing scores (under the competition's
rows-Dice an empty submission is far from 0), scores tuned on the images they are measured
on say so, and the errors are broken down by kind (confusion matrix, failure types,
galleries per type) because "green predicted red" and "polyp missed" call for different
fixes. The test gallery is decoded back from `submission.csv`, so it shows what Kaggle will
score, not what the pipeline meant to write. Everything is embedded (base64 PNG), so the
single file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from chain.records import BlendRecord, PostprocessRecord
from core.config import config_hash, git_hash
from core.metrics import (
    NOTHING_TOL,
    beats_nothing,
    class_stats,
    confusion,
    nothing_stats,
    scores_from_stats,
)
from core.settings import ExperimentSettings
from data.atomic import write_text
from data.foldlog import read_log
from data.reader import load_image
from data.submission import ROW_CLASSES, image_size, rle_decode
from data.synthetic import overlay

CLASS_NAMES = ("background", "neoplastic", "non-neoplastic")
# Curves per model; the two losses are computed differently, so each panel says how.
CURVES = {
    "train_loss": "train loss (main head, train mode)",
    "val_loss": "val loss (validation images, eval mode)",
    "competition": "val rows-Dice",
    "lr": "learning rate",
}
# The blend rows of weights.json's scores, named for a reader: tuned weights were chosen on
# the same OOF maps they are scored on.
BLEND_ROWS = {"equal": "blend (equal weights)", "tuned": "blend (tuned weights: in-sample)"}
# A fold whose validation rows-Dice stays within metrics.NOTHING_TOL of predicting nothing
# for this many epochs in a row has learnt nothing yet (e.g. a too-high learning rate).
STUCK_EPOCHS = 3
# A polyp counts as found when this fraction of it is predicted as any polyp class, and a
# predicted region as real when this fraction of it lies on a true polyp.
FOUND_FRAC = 0.1
FAILURES = {
    "missed": (
        "polyp missed",
        "a true polyp with under 10% of it predicted as any polyp class",
    ),
    "false_polyp": (
        "false polyp on clean tissue",
        "a predicted region with under 10% of it on a true polyp",
    ),
    "wrong_class": (
        "wrong class for a whole region",
        "a found polyp predicted mostly as the other class (the whole row is lost)",
    ),
    "stray": (
        "stray pixels of an absent class",
        "a class the image lacks is predicted, other than by a swapped region "
        "(under the rows-Dice a single pixel costs the whole row)",
    ),
}


@dataclass
class Case:
    """One out-of-fold image of the blend, before and after post-processing."""

    image_id: str
    image: np.ndarray
    target: np.ndarray
    pred: np.ndarray
    pred_post: np.ndarray
    score: float
    score_post: float


@dataclass
class ReportInputs:
    """What the pipeline hands over; the report computes everything else from these.

    `cases`: every OOF image; `folds`: image id -> fold (the split); `blend`, `tuned`: the
    `weights.json` and `postprocess.json` records; `test_images`: test id -> image file.
    """

    cfg: dict[str, Any]
    tables: Sequence[tuple[str, Sequence[Mapping[str, object]]]]
    cases: Sequence[Case]
    folds: Mapping[str, int]
    blend: BlendRecord
    tuned: PostprocessRecord
    logs: Mapping[str, Mapping[int, Path]] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    submission: Path | None = None
    test_images: Mapping[str, Path] = field(default_factory=dict)
    notes: Sequence[str] = ()
    # what must not be missed (a chain or fold no better than predicting nothing, a retrained
    # fold): red lines on the first screen, above everything else
    warnings: Sequence[str] = ()
    refined: Sequence[Case] = ()  # the regions refine.py changed most: blend vs refined
    source: str = "blend"  # the OOF maps of `cases`, tuned and submitted: blend or refined


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(png: str) -> str:
    return f"<img src='data:image/png;base64,{png}'>"


# --------------------------------------------------------------------------- numbers


def failure_types(pred: np.ndarray, target: np.ndarray) -> set[str]:
    """Which of FAILURES an image's prediction shows (class maps at the same size)."""
    found: set[str] = set()
    pred_polyp, true_polyp = pred > 0, target > 0
    swapped_to: set[int] = set()
    n, labels = cv2.connectedComponents(true_polyp.astype(np.uint8))
    for region in range(1, n):
        inside = labels == region
        hit = pred[inside]
        if np.count_nonzero(hit) < FOUND_FRAC * inside.sum():
            found.add("missed")
            continue
        true_class = int(np.bincount(target[inside], minlength=3)[1:].argmax()) + 1
        other = 3 - true_class
        if np.count_nonzero(hit == other) > np.count_nonzero(hit == true_class):
            found.add("wrong_class")
            swapped_to.add(other)
    n, labels = cv2.connectedComponents(pred_polyp.astype(np.uint8))
    for region in range(1, n):
        inside = labels == region
        if np.count_nonzero(true_polyp[inside]) < FOUND_FRAC * inside.sum():
            found.add("false_polyp")
            break
    for c in (1, 2):
        if c not in swapped_to and not (target == c).any() and (pred == c).any():
            found.add("stray")
    return found


def _nothing(cases: Sequence[Case]) -> np.ndarray:
    return nothing_stats([c.target for c in cases])


def _mean_std(values: Sequence[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if values else ""


def _by_fold(cases: Sequence[Case], folds: Mapping[str, int], stats: np.ndarray) -> list[float]:
    fold_of = np.array([folds.get(c.image_id, -1) for c in cases])
    return [
        scores_from_stats(stats[fold_of == k])["competition"]
        for k in sorted(set(fold_of.tolist()))
        if k >= 0
    ]


def per_class_rows(inputs: ReportInputs) -> list[dict[str, object]]:
    """OOF scores per class for nothing, each model, the blend and the post-processed blend.

    Rows-Dice per class is what the leaderboard averages; micro Dice is the papers' form.
    The fold column shows whether a difference is larger than the spread between folds.
    """
    cases = inputs.cases
    keys = {
        "rows-Dice neo": "competition_neo",
        "rows-Dice non": "competition_non",
        "Dice neo": "dice_neo",
        "Dice non": "dice_non",
        "Dice seg": "dice_seg",
    }

    def row(name: str, scores: Mapping[str, float], per_fold: Sequence[float]) -> dict:
        return {
            "OOF": name,
            "rows-Dice": scores["competition"],
            **{label: scores[k] for label, k in keys.items()},
            "rows-Dice per fold": _mean_std(per_fold),
        }

    nothing = _nothing(cases)
    targets = [c.target for c in cases]
    post = class_stats([c.pred_post for c in cases], targets)
    rows = [
        row("predict nothing", scores_from_stats(nothing), _by_fold(cases, inputs.folds, nothing))
    ]
    for name, by_fold in inputs.blend.scores.items():
        folds = [s["competition"] for k, s in by_fold.items() if k != "all"]
        rows.append(row(BLEND_ROWS.get(name, name), by_fold["all"], folds))
    if inputs.source != "blend":
        raw = class_stats([c.pred for c in cases], targets)
        rows.append(row(inputs.source, scores_from_stats(raw), _by_fold(cases, inputs.folds, raw)))
    rows.append(
        row(
            f"{inputs.source} + post-processing (tuned here: in-sample)",
            scores_from_stats(post),
            _by_fold(cases, inputs.folds, post),
        )
    )
    return rows


def failure_rows(raw: Sequence[set[str]], post: Sequence[set[str]]) -> list[dict[str, object]]:
    """Images showing each failure type, at argmax and after post-processing."""
    return [
        {
            "failure": name,
            "images at argmax": sum(key in f for f in raw),
            "post-processed": sum(key in f for f in post),
            "of": len(post),
        }
        for key, (name, _) in FAILURES.items()
    ]


def fold_baselines(cases: Sequence[Case], folds: Mapping[str, int]) -> dict[int, float]:
    """Each fold's validation rows-Dice when nothing is predicted."""
    nothing = _nothing(cases)
    fold_of = np.array([folds.get(c.image_id, -1) for c in cases])
    return {
        int(k): scores_from_stats(nothing[fold_of == k])["competition"]
        for k in sorted(set(fold_of.tolist()))
        if k >= 0
    }


def stuck_epochs(records: Sequence[Mapping[str, Any]], baseline: float) -> list[int]:
    """Epochs of the longest run (at least STUCK_EPOCHS) with the score at the baseline."""
    best: list[int] = []
    run: list[int] = []
    for r in records:
        if "competition" in r and abs(r["competition"] - baseline) <= NOTHING_TOL:
            run.append(int(r["epoch"]))
            best = max(best, run, key=len)
        else:
            run = []
    return best if len(best) >= STUCK_EPOCHS else []


def fold_warning(records: Sequence[Mapping[str, Any]], baseline: float) -> str | None:
    """Why a fold's curve needs a look: it never beat predicting nothing, or it sat on that
    score for several epochs; None when neither."""
    scores = [r["competition"] for r in records if "competition" in r]
    if scores and not beats_nothing(max(scores), baseline):
        return (
            f"never beat predicting nothing (best validation rows-Dice {max(scores):.3f}, "
            f"predict-nothing {baseline:.3f})"
        )
    epochs = stuck_epochs(records, baseline)
    if epochs:
        return (
            f"validation rows-Dice at the predict-nothing score ({baseline:.3f}) "
            f"for epochs {epochs[0]}-{epochs[-1]}"
        )
    return None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# --------------------------------------------------------------------------- figures


def _robust_ylim(ax: plt.Axes, values: Sequence[float]) -> None:
    """Clip the y-axis at 1.5x the 90th percentile when a spike would squash the rest."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size < 4:
        return
    top = 1.5 * np.percentile(values, 90)
    if values.max() > top > values.min():
        ax.set_ylim(values.min() - 0.05 * (top - values.min()), top)
        ax.text(
            0.98,
            0.95,
            f"{int((values > top).sum())} above, clipped (max {values.max():.3g})",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="#b00",
        )


def curves_figure(
    logs: Mapping[str, Mapping[int, Path]], baselines: Mapping[int, float]
) -> tuple[str, list[str]]:
    """One row per model, one column per curve, one line per fold; and the stuck folds.

    The rows-Dice panel draws each fold's predict-nothing score dashed and shades the
    epochs a fold sat on it; the LR panel is on a log scale.
    """
    models = sorted(logs)
    stuck: list[str] = []
    fig, axes = plt.subplots(
        len(models), len(CURVES), figsize=(4 * len(CURVES), 2.6 * len(models)), squeeze=False
    )
    for row, model in zip(axes, models, strict=True):
        for ax, (key, title) in zip(row, CURVES.items(), strict=True):
            values: list[float] = []
            for fold, path in sorted(logs[model].items()):
                records = read_log(path)
                xs = [r["epoch"] for r in records if key in r]
                ys = [r[key] for r in records if key in r]
                values += ys
                (line,) = ax.plot(xs, ys, marker=".", label=f"fold {fold}")
                if key == "competition" and fold in baselines:
                    ax.axhline(baselines[fold], color=line.get_color(), ls="--", lw=0.8)
                    epochs = stuck_epochs(records, baselines[fold])
                    if epochs:
                        ax.axvspan(epochs[0] - 0.5, epochs[-1] + 0.5, color="#f33", alpha=0.15)
                    warning = fold_warning(records, baselines[fold])
                    if warning:
                        stuck.append(f"{model} fold {fold}: {warning}")
            if key == "lr":
                if values and min(values) > 0:
                    ax.set_yscale("log")
            elif key != "competition":
                _robust_ylim(ax, values)
            ax.set_title(f"{model}: {title}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig), stuck


CASE_TITLES = ("image", "ground truth", "prediction", "post-processed")
REFINED_TITLES = ("region window", "ground truth", "blend", "refined")


def cases_figure(cases: Sequence[Case], titles: Sequence[str] = CASE_TITLES) -> str:
    """Image, ground truth, prediction, post-processed (or refined) prediction per case."""
    fig, axes = plt.subplots(len(cases), 4, figsize=(11, 2.4 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        panels = (
            case.image,
            overlay(case.image, case.target),
            overlay(case.image, case.pred),
            overlay(case.image, case.pred_post),
        )
        for col, (ax, panel) in enumerate(zip(row, panels, strict=True)):
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            label = titles[col]
            if col == 2:
                label += f" ({case.score:.3f})"
            if col == 3:
                label += f" ({case.score_post:.3f})"
            ax.set_title(label, fontsize=8)
        row[0].set_ylabel(case.image_id[:10], fontsize=7)
    fig.tight_layout()
    return _png(fig)


def histogram_figure(cases: Sequence[Case]) -> str:
    """Per-image rows-Dice, argmax against post-processed: where the mass of errors lies."""
    fig, ax = plt.subplots(figsize=(7, 2.6))
    bins = np.linspace(0, 1, 21)
    ax.hist([c.score for c in cases], bins=bins, alpha=0.6, label="argmax")
    ax.hist([c.score_post for c in cases], bins=bins, alpha=0.6, label="post-processed")
    ax.set_xlabel("rows-Dice of one image (mean of its two rows)", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def read_submission(path: Path, images: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Class maps decoded from a submission at each test image's original size."""
    maps: dict[str, np.ndarray] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            image_id, suffix = row["Id"].rsplit("_", 1)
            if image_id not in maps:
                maps[image_id] = np.zeros(image_size(images[image_id]), np.uint8)
            mask = rle_decode(row["Expected"], maps[image_id].shape)
            maps[image_id][mask > 0] = ROW_CLASSES[suffix]
    return maps


def submission_rows(maps: Mapping[str, np.ndarray]) -> list[dict[str, object]]:
    """How many test images the submission gives each combination of classes."""
    kinds = {"neoplastic only": (1,), "non-neoplastic only": (2,), "both": (1, 2), "nothing": ()}
    present = [tuple(c for c in (1, 2) if (m == c).any()) for m in maps.values()]
    return [
        {"submission: test images with": k, "images": present.count(v)} for k, v in kinds.items()
    ]


# Width the gallery draws a test image at: each cell shows about 250 px. Drawn at full
# size, one 8000 x 6000 frame took the report (and so the pipeline) from 1.1 to 3.6 GB.
GALLERY_WIDTH = 640


def _thumbnail(image: np.ndarray, class_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An image and its class map no wider than GALLERY_WIDTH."""
    h, w = class_map.shape
    if w <= GALLERY_WIDTH:
        return image, class_map
    size = (GALLERY_WIDTH, max(1, round(h * GALLERY_WIDTH / w)))
    return (
        cv2.resize(image, size, interpolation=cv2.INTER_AREA),
        cv2.resize(class_map, size, interpolation=cv2.INTER_NEAREST),
    )


def test_gallery(maps: Mapping[str, np.ndarray], images: Mapping[str, Path], n: int = 8) -> str:
    """The first n test images (by id) with the submission's masks drawn over them."""
    ids = sorted(maps)[:n]
    cols = 4
    rows = -(-len(ids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image_id in zip(axes.ravel(), ids, strict=False):
        class_map = maps[image_id]
        ax.imshow(overlay(*_thumbnail(load_image(images[image_id]), class_map)))
        area = [100 * float((class_map == c).mean()) for c in (1, 2)]
        ax.set_title(f"{image_id[:8]}: neo {area[0]:.1f}%, non {area[1]:.1f}%", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def confusion_html(cases: Sequence[Case], source: str = "blend") -> str:
    """Pixels of each true class (rows) by predicted class (columns), post-processed OOF."""
    total = (
        confusion(np.stack([c.pred_post for c in cases]), np.stack([c.target for c in cases]))
        .sum(axis=0)
        .T
    )  # [target, pred]
    share = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    head = "".join(f"<th>predicted {n}</th>" for n in CLASS_NAMES)
    body = "".join(
        f"<tr><td>true {name}</td>"
        + "".join(f"<td>{total[t, p]:,} ({100 * share[t, p]:.1f}%)</td>" for p in range(3))
        + "</tr>"
        for t, name in enumerate(CLASS_NAMES)
    )
    return (
        f"<h2>Pixel confusion matrix (OOF {source}, post-processed)</h2>"
        "<p>Pixels at working resolution; each row's shares sum to 100%.</p>"
        f"<table class='confusion'><tr><th></th>{head}</tr>{body}</table>"
    )


# --------------------------------------------------------------------------- the page


def table_html(title: str, rows: Sequence[Mapping[str, object]], note: str = "") -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)

    def cell(value: object) -> str:
        if value is None:
            return "<td>-</td>"
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f"<td>{html.escape(text)}</td>"

    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    note = f"<p>{html.escape(note)}</p>" if note else ""
    return f"<h2>{html.escape(title)}</h2>{note}<table><tr>{head}</tr>{body}</table>"


def provenance_html(inputs: ReportInputs) -> str:
    """What made these numbers: code, config, split, data, time."""
    made = inputs.tuned.provenance.get("git")
    items = {
        "experiment": ExperimentSettings.from_config(inputs.cfg).experiment,
        "git": git_hash() or "unknown",
        "artefacts made at git": made or "unknown",
        "config hash": config_hash(inputs.cfg),
        "split id": inputs.blend.split_id or "unknown",
        "data": ExperimentSettings.from_config(inputs.cfg).data_dir,
        "report written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    text = " · ".join(f"{k} <code>{html.escape(str(v))}</code>" for k, v in items.items())
    return f"<p class='provenance'>{text}</p>"


def ablation_rows(tuned: PostprocessRecord) -> list[dict[str, object]]:
    """postprocess.json's ablation: each step's objective with and without it, and whether
    it stayed in the tuned parameters (in sample; the submission's rule is decisions.py's)."""
    rows = []
    for rec in tuned.ablation:
        rows.append(
            {
                "step": rec["step"],
                f"{tuned.objective} with": rec.get("with", ""),
                "without": rec.get("without", ""),
                "no class worse than argmax": "yes" if rec["no_class_worse_than_argmax"] else "no",
                "in the tuned parameters": "stays" if rec["kept"] else "dropped",
            }
        )
    return rows


# The in-sample pruning of the tuned candidate, labelled so that no reader takes it for the
# rule that chose the submission (the out-of-sample decisions at the top of the report).
ABLATION_TITLE = "Pruning of the tuned post-processing (in sample, not used for the submission)"
ABLATION_NOTE = (
    "Part of fitting the 'tuned' candidate on all out-of-fold images: after the search, each "
    "step is switched off in turn and stays only if it raises the objective on these same "
    "images and leaves no class below argmax. Whether the tuned parameters are submitted is "
    "decided out of sample, each fold scored by parameters fitted without it, and only when "
    "their gain over the simple chains has a paired bootstrap interval above zero "
    "(the Decisions table)."
)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .legend span { padding: 2px 8px; margin-right: 8px; color: white; }
.provenance { color: #555; font-size: 13px; } .flag { color: #b00; font-weight: bold; }
"""


def write_report(path: str | Path, title: str, inputs: ReportInputs) -> Path:
    """Write the report atomically and return its path."""
    cases = inputs.cases
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{STYLE}</style><h1>{html.escape(title)}</h1>")
    parts.extend(f"<p class='flag'>{html.escape(w)}</p>" for w in inputs.warnings)
    parts.append(provenance_html(inputs))
    parts.extend(f"<p>{html.escape(n)}</p>" for n in inputs.notes)
    parts.append(
        "<p class='legend'><span style='background:#e62828'>neoplastic</span>"
        "<span style='background:#28c83c'>non-neoplastic</span></p>"
    )
    parts.extend(table_html(t, rows) for t, rows in inputs.tables)
    parts.append(
        table_html(
            "Per class, out of fold (working resolution)",
            per_class_rows(inputs),
            "Rows-Dice averages image x class rows (an absent class predicted absent scores 1); "
            "micro Dice pools all pixels. In-sample rows were tuned on these same images.",
        )
    )
    weights = [
        {"model": m, "blend weight": float(w)}
        for m, w in zip(inputs.blend.models, inputs.blend.weights, strict=True)
    ]
    decision = inputs.blend.decision
    reason = decision.reason if decision else "one model, nothing to blend"
    parts.append(
        table_html(
            f"Blend weights ({inputs.blend.chosen})",
            weights,
            f"Chosen out of sample: {reason}. Weights are searched on "
            f"{inputs.blend.objective} over the OOF maps.",
        )
    )
    parts.append(table_html(ABLATION_TITLE, ablation_rows(inputs.tuned), ABLATION_NOTE))
    parts.append(confusion_html(cases, inputs.source))
    post = [failure_types(c.pred_post, c.target) for c in cases]
    raw = [failure_types(c.pred, c.target) for c in cases]
    parts.append(
        table_html(
            "Failure types",
            failure_rows(raw, post),
            f"OOF images of the {inputs.source} maps showing each kind of error; an image may "
            "show several.",
        )
    )
    parts.append(
        "<ul>"
        + "".join(
            f"<li><b>{name}</b>: {html.escape(text)}</li>" for name, text in FAILURES.values()
        )
        + "</ul>"
    )
    parts.append(f"<h2>Per-image scores (OOF {inputs.source})</h2>{_img(histogram_figure(cases))}")
    if inputs.logs:
        png, stuck = curves_figure(inputs.logs, fold_baselines(cases, inputs.folds))
        flags = "".join(f"<p class='flag'>{html.escape(s)}</p>" for s in stuck)
        parts.append(
            "<h2>Training curves</h2><p>Dashed: each fold's predict-nothing rows-Dice; a red "
            f"band marks epochs stuck on it. Loss axes are clipped above spikes.</p>{flags}"
            + _img(png)
        )
    ranked = sorted(range(len(cases)), key=lambda i: cases[i].score_post)
    best = [cases[i] for i in ranked[::-1][:3]]
    parts.append(f"<h2>Best out-of-fold cases</h2>{_img(cases_figure(best))}")
    parts.append("<h2>Worst out-of-fold cases, by failure type</h2>")
    for key, (name, _) in FAILURES.items():
        group = [cases[i] for i in ranked if key in post[i]][:3]
        body = _img(cases_figure(group)) if group else "<p>none</p>"
        parts.append(f"<h3>{name} ({sum(key in f for f in post)} images)</h3>{body}")
    if inputs.submission is not None and inputs.submission.exists():
        maps = read_submission(inputs.submission, inputs.test_images)
        parts.append(
            table_html("Test predictions, decoded from submission.csv", submission_rows(maps))
        )
        parts.append(_img(test_gallery(maps, inputs.test_images)))
    times = [{"stage": k, "time": _duration(v)} for k, v in inputs.timings.items()]
    if inputs.refined:
        parts.append(
            "<h2>Regions the refinement changed most (out-of-fold; scores are the whole "
            f"image's)</h2>{_img(cases_figure(inputs.refined, REFINED_TITLES))}"
        )
    parts.append(table_html("Time each stage took when it last ran", times))
    path = Path(path)
    write_text(path, "\n".join(parts))
    return path
