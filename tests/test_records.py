"""The chain's decision documents as typed records (chain/records.py): what a finished
experiment wrote reads back as its record and writes the same bytes; a document of
before the records (no `schema`) reads as today's; a newer schema, an unknown key, a
value of the wrong type or a key a reader cannot do without is one line naming the file
and the command that makes it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chain.postprocessing import PostprocessParams
from chain.records import (
    SCHEMA,
    BlendRecord,
    Decision,
    PostprocessRecord,
    RefineRecord,
    input_store,
    load_params,
)
from core.paths import Layout
from core.settings import layout_of
from data.reader import DataError

RECORDS = {"weights": BlendRecord, "refine_record": RefineRecord, "postprocess": PostprocessRecord}


@pytest.fixture(scope="module")
def documents(two_model_experiment: Path) -> dict[str, Path]:
    """The three documents of the finished two-model experiment (flip TTA, a refiner)."""
    layout = Layout.at(two_model_experiment / "out" / "tiny")
    return {name: getattr(layout, name) for name in RECORDS}


@pytest.mark.parametrize("name", list(RECORDS))
def test_what_the_stages_wrote_reads_back_and_writes_the_same_bytes(documents, name, tmp_path):
    path = documents[name]
    record = RECORDS[name].read(path)
    assert json.loads(path.read_text())["schema"] == SCHEMA
    again = tmp_path / path.name
    record.write(again)
    assert again.read_bytes() == path.read_bytes()
    assert RECORDS[name].read(again) == record and record.where == path
    # before the records: the same document without a schema field, read as it is
    older = json.loads(path.read_text())
    del older["schema"]
    again.write_text(json.dumps(older))
    assert RECORDS[name].read(again) == record


def test_the_records_hold_what_the_readers_use(documents):
    blend = BlendRecord.read(documents["weights"])
    tuned = PostprocessRecord.read(documents["postprocess"])
    refined = RefineRecord.read(documents["refine_record"])
    assert blend.models == ["tiny", "tiny2"] and len(blend.weights) == 2
    assert set(blend.candidates) == {"equal", "best single", "tuned"}
    assert blend.candidates["best single"].model in blend.models
    assert isinstance(blend.decision, Decision) and blend.chosen == blend.decision.chosen
    assert isinstance(tuned.params, PostprocessParams) and tuned.source in tuned.sources
    assert tuned.decision.chosen_row == tuned.decision.candidates[tuned.chosen]
    assert len(tuned.oos_image_stats) == len(tuned.image_ids) == tuned.n_images
    assert refined.refined_mask.kept == (refined.refined_mask.decision.chosen == "refined mask")
    assert all(step.base and step.to for step in tuned.decision.steps)


def refusal(path: Path, record: type = BlendRecord) -> str:
    with pytest.raises(DataError) as info:
        record.read(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"schema": 2}, "schema 2, which this version does not read (it reads 0 to 1)"),
        ({"schema": "1"}, "schema '1', which this version does not read"),
        ({"weigths": [0.5, 0.5]}, "unknown keys weigths"),
        ({"models": "tiny"}, "models: expected a list, got 'tiny'"),
        ({"trials": True}, "trials: expected a whole number, got True"),
    ],
)
def test_a_document_it_cannot_read_is_refused_by_name(documents, tmp_path, change, words):
    doc = {**json.loads(documents["weights"].read_text()), **change}
    path = tmp_path / "weights.json"
    path.write_text(json.dumps(doc))
    message = refusal(path)
    assert words in message and "make it again: python ensemble.py" in message


def test_a_wrong_value_deep_inside_is_named_by_its_key_path(documents, tmp_path):
    doc = json.loads(documents["postprocess"].read_text())
    first = next(iter(doc["decision"]["candidates"]))
    doc["decision"]["candidates"][first]["level"] = "one"
    doc["fold_params"]["0"]["region_mode"] = "vote"
    path = tmp_path / "postprocess.json"
    path.write_text(json.dumps(doc))
    message = refusal(path, PostprocessRecord)
    assert f"decision.candidates.{first}.level: expected a whole number, got 'one'" in message
    assert "make it again: python tune.py" in message
    del doc["decision"]
    path.write_text(json.dumps(doc))
    assert "fold_params.0: region_mode must be one of" in refusal(path, PostprocessRecord)


@pytest.mark.parametrize("text", ["{", "[1, 2]", ""])
def test_an_unreadable_document_names_the_stage_that_makes_it(tmp_path, text):
    path = tmp_path / "refine.json"
    path.write_text(text)
    assert "make it again: python refine.py" in refusal(path, RefineRecord)


def test_a_missing_document_names_the_pipeline(tmp_path):
    message = refusal(tmp_path / "weights.json")
    assert "not found: the stage that writes it has not run yet" in message
    assert "run it first: python pipeline.py" in message


def test_an_older_document_is_read_and_a_reader_that_needs_more_says_so(tmp_path):
    """What an older version did not write takes its empty value; a reader that cannot do
    without it (compare.py pairs experiments by the per-image stats) names the file."""
    path = tmp_path / "postprocess.json"
    path.write_text(json.dumps({"params": {"min_area_frac": 0.01}, "chosen": "blend, tuned"}))
    tuned = PostprocessRecord.read(path)
    assert tuned.params == PostprocessParams(min_area_frac=0.01) and tuned.source == "blend"
    assert tuned.oos_image_stats == [] and tuned.holds("chosen") and not tuned.holds("seed")
    tuned.need("params", "chosen")
    with pytest.raises(DataError) as info:
        tuned.need("chosen", "oos_image_stats", "image_ids")
    assert str(info.value).startswith(
        f"{path}: no oos_image_stats, image_ids recorded (an older version made it); "
        "make it again: python tune.py"
    )
    # bare parameters, which postprocess.py --params has always read
    path.write_text(json.dumps({"fill_holes": True}))
    assert load_params(path) == PostprocessParams(fill_holes=True)
    path.write_text(json.dumps({"fill_holes": True, "zed": 1}))
    assert "unknown keys fill_holes, zed" in refusal(path, PostprocessRecord)


def test_the_submission_chain_starts_from_the_store_the_record_names(tmp_path):
    cfg = {"experiment": "e", "out_dir": str(tmp_path)}
    layout = layout_of(cfg)
    assert input_store(cfg, "test")[0] == layout.blend("test")  # tune.py has not run
    layout.postprocess.parent.mkdir(parents=True)
    layout.postprocess.write_text(json.dumps({"schema": 1, "source": "refined", "chosen": "x"}))
    assert input_store(cfg, "test") == (layout.refined("test"), "tune.py chose x")
    layout.postprocess.write_text(json.dumps({"source": "both"}))
    with pytest.raises(DataError) as info:
        input_store(cfg, "oof")
    message = str(info.value)
    assert "unknown source 'both'" in message and "python tune.py" in message
