"""Issue 40 items 5 and 6: the pipeline says why each stage reruns, lists the others as
reused, keeps its console to a screen (the stages' own output goes to logs/pipeline.log,
or to the console too with -v), and every text states the one keep rule of decisions.py."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import pipeline
from chain.stamps import Stamps
from core.paths import Layout
from core.runtime import Dist
from data.prepare import prepare_train_data
from data.reader import list_train
from tests.test_export import private_copy
from workflow import planning, stages

# What the pipeline and its stages say when a stage runs on a changed TTA.
TTA = 'predict.tta: "hflip" -> "none"'
# The title line of each decision table (decisions.format_decision)
DECIDED = "(judged on out-of-sample"
SCREEN = 40


def _table(out: str) -> dict[str, str]:
    """The "Stages of this call" table: {stage: seconds, or "reused"}."""
    table = out.split("Stages of this call")[1].strip().split("\n\n")[0]
    rows = [line.rsplit(None, 1) for line in table.splitlines()[1:]]
    return {name.strip(): ran for name, ran in rows}


def _running(err: str) -> dict[str, str]:
    """{stage: why} of the pipeline's `<stage>: running (<why>)` lines."""
    found = re.findall(r"INFO pipeline: (.+?): running \((.*)\)$", err, re.MULTILINE)
    return dict(found)


def _last_call(log: Path) -> str:
    """The part of logs/pipeline.log that the last pipeline call wrote."""
    return log.read_text().split("INFO pipeline: pipeline.py ")[-1]


@pytest.fixture(scope="module")
def copy(two_model_experiment: Path, tmp_path_factory: pytest.TempPathFactory):
    """A private copy of the finished two-model experiment (flip TTA, refiner), the flags
    that point the stages at it, and what the copy's first pipeline call printed and logged
    on the console (stdout, stderr)."""
    root, flags = private_copy(two_model_experiment, tmp_path_factory.mktemp("why"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert pipeline.main(flags) == 0
    return root, flags, out.getvalue(), err.getvalue()


@pytest.mark.slow(44)
def test_reruns_say_why_list_the_reused_and_fit_a_screen(copy, capsys):
    """The done-when of item 5, in one sequence on the copy (the order matters)."""
    root, flags, out, err = copy
    log = Layout.at(root / "out" / "tiny").pipeline_log
    # a moved experiment reruns the report only, which shows the paths that changed
    table = _table(out)
    assert {k for k, v in table.items() if v != "reused"} == {"report"}, table
    assert set(_running(err)) == {"report"}
    assert "data_dir: " in _running(err)["report"] and "(through config.yaml)" in err

    # nothing changed: every stage is listed as reused, none with a time
    assert pipeline.main(flags) == 0
    out, err = capsys.readouterr()
    table = _table(out)
    expected = ["train tiny", "train tiny2", "predict tiny", "predict tiny2", "ensemble"]
    assert list(table) == [*expected, "refine", "tune", "postprocess", "report"]
    assert set(table.values()) == {"reused"}, table
    assert not _running(err)

    # another TTA: each rerun stage's line names it (old -> new), the later ones through
    # the inputs the earlier ones rewrote; the console fits a screen, the stages' tables go
    # to the log file, each decision table once
    assert pipeline.main([*flags, "--set", "predict.tta=none"]) == 0
    out, err = capsys.readouterr()
    running = _running(err)
    rerun = ["predict tiny", "predict tiny2", "ensemble", "refine", "tune", "postprocess"]
    assert list(running) == [*rerun, "report"], running
    assert all(why.startswith(TTA) for why in running.values()), running
    assert "(through tiny/oof, tiny/test, tiny2/oof and 1 more)" in running["ensemble"]
    table = _table(out)
    assert table["train tiny"] == table["train tiny2"] == "reused"
    assert all(re.fullmatch(r"\d+\.\d", table[s]) for s in running), table
    console = (out + err).splitlines()
    assert len(console) <= SCREEN, "\n".join(console)
    assert DECIDED not in out + err
    logged = _last_call(log)
    titles = [line.split(" (judged")[0] for line in logged.splitlines() if DECIDED in line]
    assert titles == ["blend", "refined mask", "post-processing and refinement"], titles
    assert "Decisions (out of sample" not in logged  # report.py no longer repeats them
    assert "Test set (original size, test_gt/)" in logged  # report.py's own tables

    # -v: the stages' own output on the console too, each decision table once
    assert pipeline.main([*flags, "-v", "--set", "predict.tta=none", "--set", "tune.trials=4"]) == 0
    out, err = capsys.readouterr()
    assert _running(err)["tune"] == "tune.trials: 3 -> 4"
    assert [line for line in out.splitlines() if DECIDED in line] == [
        "post-processing and refinement (judged on out-of-sample competition, region maps)"
    ]
    assert "Out-of-fold (working resolution)" in out  # report.py's own, on the console
    assert "Out-of-fold (working resolution)" in _last_call(log)  # and in the log file


def test_the_folds_to_train_say_why(copy, tmp_path):
    """The train line's reasons: a fold to continue to more epochs, one whose training mask
    changed; `fold_reasons` groups them."""
    root = copy[0]
    cfg = yaml.safe_load((root / "tiny.yaml").read_text())
    cfg.update(data_dir=str(root / "data"), out_dir=str(root / "out"))
    data = prepare_train_data(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
    assert planning.folds_to_train(cfg, "tiny", data) == {}
    longer = {**cfg, "train": {**cfg["train"], "epochs": 2}}
    due = planning.folds_to_train(longer, "tiny", data)
    assert due == {k: (1, "continued from epoch 1 to 2") for k in (0, 1)}
    assert pipeline.fold_reasons(due) == "folds 0 and 1: continued from epoch 1 to 2"
    split = json.loads((root / "out" / "tiny" / "folds.json").read_text())["folds"]
    sample = next(s for s in list_train(root / "data") if split[s.id] == 0)
    mask = cv2.imread(str(sample.mask))
    saved = sample.mask.read_bytes()
    try:
        assert cv2.imwrite(str(sample.mask), np.roll(mask, 6, axis=1))
        data = prepare_train_data(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
        due = planning.folds_to_train(cfg, "tiny", data)
        changed = f"its training data changed: 1 mask (train_gt/{sample.mask.name})"
        assert due == {1: (0, changed)}  # fold 1 trained on it, fold 0 validated on it
        assert pipeline.fold_reasons(due) == f"fold 1: {changed}"
    finally:
        sample.mask.write_bytes(saved)


def test_stage_due_names_what_changed(tmp_path):
    """Every reason `stage_due` gives: a first run, a missing output, no record, an input
    changed by bytes or by an earlier stage's cause, a recorded setting."""
    exp, data = tmp_path / "exp", tmp_path / "data"
    (data / "train").mkdir(parents=True)
    exp.mkdir()
    made, image, out = exp / "made.json", data / "train" / "x.jpeg", exp / "out.json"
    made.write_text("1")
    image.write_bytes(b"x")
    stage = stages.Stage(
        "count",
        stages.cli.report_parser,
        argv=lambda plan, _: [],
        outputs=lambda plan, _: [out],
        inputs=lambda plan, _: [made, image],
        record=lambda plan, _: (out, {"k": plan.cfg["k"], "decide": {"n": 1}}),
        shown={"decide": "decide"},
    )
    plan = stages.Plan({"data_dir": str(data), "k": 2}, Layout.at(exp), [], [], [])
    stamps = Stamps(exp / "stamps.json")

    def why(**kw) -> list[str]:
        return [text for text, _ in pipeline.stage_due(stage, plan, "", stamps, **kw)[1]]

    assert why() == ["first run"]
    out.write_text(json.dumps({"k": 2, "decide": {"n": 1}}))
    assert why() == ["no record of the inputs it last ran on (stamps.json)"]
    stamps.record("count", pipeline.stage_due(stage, plan, "", stamps)[0])
    assert why() == []
    image.write_bytes(b"y")
    made.write_text("2")
    assert why() == ["made.json and train/x.jpeg changed"]
    assert why(causes={"made.json": "a: 1 -> 2"}) == [
        "train/x.jpeg changed",
        "a: 1 -> 2 (through made.json)",
    ]
    stamps.record("count", pipeline.stage_due(stage, plan, "", stamps)[0])
    out.write_text(json.dumps({"k": 1, "decide": {"n": 3}}))
    assert why() == ["count.k: 1 -> 2", "decide.n: 3 -> 1"]
    out.unlink()
    assert why() == ["out.json missing"]
    image.unlink()
    assert why() == ["train/x.jpeg missing"]


OLD_RULES = (
    "no class gets worse",
    "refine.py kept",
    "kept the refinement",
    "nnU-Net's rule",
    "A step is kept only if",
)


def test_every_help_and_the_report_state_the_out_of_sample_keep_rule(copy):
    """Item 6: no --help and no report text describes a keep rule but decisions.py's; the
    in-sample pruning of the tuned parameters is labelled as not used for the submission."""
    root = copy[0]
    helps = {name: stages.parser(name).format_help() for name in [*stages.TOOLS, "refine"]}
    helps.update({s.name: s.parser().format_help() for s in stages.STAGES})
    page = (root / "out" / "tiny" / "report.html").read_text()
    for text in [*helps.values(), page]:
        flat = " ".join(text.split())
        assert not [old for old in OLD_RULES if old in flat], flat[:200]
    refine_help = " ".join(helps["refine"].split())
    assert "tune.py's decision, out of sample (decisions.py)" in refine_help
    assert "paired bootstrap interval above zero" in refine_help
    assert "when tune.py chose the refined maps out of sample" in " ".join(
        helps["postprocess"].split()
    )
    assert "Pruning of the tuned post-processing (in sample, not used for the submission)" in page
