"""A self-contained HTML report of an experiment: curves, score tables, overlays.

People look at pictures before numbers, so the report leads with training curves and the
best and worst out-of-fold cases drawn over the images, before and after post-processing.
Everything is embedded (base64 PNG), so the single file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from data.atomic import write_text
from data.synthetic import overlay
from train import read_log

CURVE_KEYS = ("train_loss", "val_loss", "competition")


@dataclass
class Case:
    """One out-of-fold image shown in the report."""

    image_id: str
    image: np.ndarray
    target: np.ndarray
    pred: np.ndarray
    pred_post: np.ndarray
    score: float
    score_post: float


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def curves_figure(logs: Mapping[str, Mapping[int, Path]]) -> str:
    """One row per model, one column per curve, one line per fold."""
    models = sorted(logs)
    fig, axes = plt.subplots(
        len(models),
        len(CURVE_KEYS),
        figsize=(4 * len(CURVE_KEYS), 2.6 * len(models)),
        squeeze=False,
    )
    for row, model in zip(axes, models, strict=True):
        for ax, key in zip(row, CURVE_KEYS, strict=True):
            for fold, path in sorted(logs[model].items()):
                records = read_log(path)
                xs = [r["epoch"] for r in records if key in r]
                ax.plot(xs, [r[key] for r in records if key in r], marker=".", label=f"fold {fold}")
            ax.set_title(f"{model}: {key}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


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


def table_html(title: str, rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)

    def cell(value: object) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f"<td>{html.escape(text)}</td>"

    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .legend span { padding: 2px 8px; margin-right: 8px; color: white; }
"""


def write_report(
    path: str | Path,
    title: str,
    tables: Sequence[tuple[str, Sequence[Mapping[str, object]]]],
    logs: Mapping[str, Mapping[int, Path]],
    best: Sequence[Case],
    worst: Sequence[Case],
    notes: Sequence[str] = (),
    refined: Sequence[Case] = (),
) -> Path:
    """Write the report atomically and return its path.

    `refined`: the regions refine.py changed most, drawn blend against refined.
    """
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{STYLE}</style><h1>{html.escape(title)}</h1>")
    parts.extend(f"<p>{html.escape(n)}</p>" for n in notes)
    parts.append(
        "<p class='legend'><span style='background:#e62828'>neoplastic</span>"
        "<span style='background:#28c83c'>non-neoplastic</span></p>"
    )
    parts.extend(table_html(t, rows) for t, rows in tables)
    if logs:
        parts.append(
            f"<h2>Training curves</h2><img src='data:image/png;base64,{curves_figure(logs)}'>"
        )
    for heading, cases in (("Best out-of-fold cases", best), ("Worst out-of-fold cases", worst)):
        if cases:
            img = cases_figure(cases)
            parts.append(f"<h2>{heading}</h2><img src='data:image/png;base64,{img}'>")
    if refined:
        img = cases_figure(refined, REFINED_TITLES)
        parts.append(
            "<h2>Regions the refinement changed most (out-of-fold; scores are the whole "
            f"image's)</h2><img src='data:image/png;base64,{img}'>"
        )
    path = Path(path)
    write_text(path, "\n".join(parts))
    return path
