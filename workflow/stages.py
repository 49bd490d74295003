"""The commands, declared once: each one's parser and config, and for a stage what it
reads and writes, what makes its outputs stale and what of the config it checks.

`pipeline.py` runs the stage entries in order and checks their settings before any fold
trains, `stages.preflight` answers every command's `--help` and refuses its bad config
before torch is imported, and the layout test reads the same table (the lint needs no
list: see pyproject.toml). Adding a stage is its script at the root (a module with
`main(argv) -> int` that calls `stages.preflight(name)` before its heavy imports) and
one `Stage` here; its files go in `Layout.stage_dir(name)`, and the pipeline runs it
when the bytes of one of its inputs changed since it last ran (stamps.py), an output is
missing, or its recorded settings differ from the config's.
Entries name their script by module, imported only when the stage runs, and import what
their checks need only when they run, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from core import invocation
from core.config import (
    ConfigError,
    add_config_arguments,
    apply_overrides,
    load_config,
    resolve_cli_config,
)
from core.paths import Layout
from core.settings import (
    DataSettings,
    EnsembleSettings,
    ExperimentSettings,
    PredictSettings,
    RefineSettings,
    config_models,
    refining,
)
from workflow import cli

if TYPE_CHECKING:
    from data.reader import Sample


def model_names(cfg: dict[str, Any]) -> list[str]:
    """The models the pipeline trains: `ensemble.models` if set, else every config model."""
    names = EnsembleSettings.from_config(cfg).models or config_models(cfg)
    if not names:
        raise ConfigError("the config lists no models")
    return names


@dataclass(frozen=True)
class Plan:
    """What the entries read: the config, its layout, the blended models, and the flags
    every stage call shares (`common`) or the optuna stages add (`search`)."""

    cfg: dict[str, Any]
    layout: Layout
    models: list[str]
    common: list[str]
    search: list[str]

    @property
    def n_folds(self) -> int:
        return DataSettings.from_config(self.cfg).n_folds

    @property
    def refining(self) -> bool:
        return refining(self.cfg)

    @property
    def decide(self) -> dict[str, Any]:
        """The decision rule, recorded by every stage that decides out of sample."""
        from chain.decisions import Rule

        return {"decide": Rule.from_config(self.cfg).to_dict()}

    def searched(self, section: str, searches: bool) -> dict[str, Any]:
        """What an optuna stage records of its settings; `trials` only when it searched."""
        from chain.studies import search_settings

        trials, objective = search_settings(self.cfg, section)
        return {"objective": objective, "trials": trials} if searches else {"objective": objective}

    @functools.cached_property
    def images(self) -> list[Path]:
        """The split and every image: what each model's predictions read besides weights."""
        return [self.layout.folds, *(s.image for s in self._train), *self.test_images]

    @functools.cached_property
    def test_images(self) -> list[Path]:
        from data.reader import list_test

        return [s.image for s in list_test(ExperimentSettings.from_config(self.cfg).data())]

    @functools.cached_property
    def masks(self) -> list[Path]:
        """Every training mask: what the stages that score or fit on out-of-fold maps
        compare them with, so a cleaned mask reruns them even where no map changed."""
        return [s.mask for s in self._train if s.mask is not None]

    @functools.cached_property
    def test_masks(self) -> list[Path]:
        """The test set's ground truth, when the data folder has one (report.py scores it)."""
        from data.reader import list_test_gt

        return [
            s.mask
            for s in list_test_gt(ExperimentSettings.from_config(self.cfg).data()) or []
            if s.mask
        ]

    def named(self, paths: Sequence[Path]) -> dict[str, Path]:
        """Each path by the name the pipeline's lines and stamps.json give it: below the
        experiment folder ("unet/oof"), else below the data folder ("train_gt/ab12.jpeg"),
        else in full. Not the full path, so a moved or copied experiment reruns nothing."""
        roots = (self.layout.root, ExperimentSettings.from_config(self.cfg).data())
        return {
            next((p.relative_to(r).as_posix() for r in roots if p.is_relative_to(r)), str(p)): p
            for p in paths
        }

    @functools.cached_property
    def _train(self) -> list[Sample]:
        from data.reader import list_train

        return list_train(ExperimentSettings.from_config(self.cfg).data())


Paths = Callable[[Plan, str], list[Path]]
# (the JSON artefact that records the settings, the settings it must record)
Record = Callable[[Plan, str], tuple[Path, dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    """A command a user types, `<name>.py` at the root: its parser (light, so that `--help`
    comes before torch), and `config`, how it resolves its config from its arguments (None:
    it reads none): the function the command itself calls, so that `preflight` refuses
    what the command would, and no more."""

    name: str
    parser: Callable[[], argparse.ArgumentParser]
    config: Callable[[argparse.Namespace], Any] | None = None


@dataclass(frozen=True)
class Stage(Command):
    """A stage. With `argv` it is a pipeline step, run after training in table order,
    once per model when `per_model` (the `str` its callables get; "" otherwise). Without
    `outputs` and `inputs` it runs on every pipeline call (it decides for itself what to
    redo); `record` names settings the inputs' bytes cannot show (a changed TTA), each
    shown in the pipeline's lines as `<name>.<key>` unless `shown` names it otherwise (the
    config key the user sets). `check` raises ConfigError or DataError for what the stage
    would refuse in the config or the data, so that pipeline.py refuses it before any
    fold trains rather than after."""

    argv: Callable[[Plan, str], list[str]] | None = None
    outputs: Paths | None = None
    inputs: Paths | None = None
    record: Record | None = None
    per_model: bool = False
    enabled: Callable[[Plan], bool] = lambda plan: True
    shown: Mapping[str, str] = dataclasses.field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None

    def module(self) -> ModuleType:
        return importlib.import_module(self.name)


def _check_predict(cfg: dict[str, Any]) -> None:
    """Every test image readable: a truncated one is named before training."""
    from data.reader import check_image_file, list_test

    for sample in list_test(ExperimentSettings.from_config(cfg).data()):
        check_image_file(sample.image)


def _check_report(cfg: dict[str, Any]) -> None:
    """Unpaired or unreadable test_gt/ files, which only this last stage reads."""
    from data.reader import check_image_file, list_test_gt

    for sample in list_test_gt(ExperimentSettings.from_config(cfg).data()) or []:
        check_image_file(sample.mask)


def _predict_record(plan: Plan, model: str) -> tuple[Path, dict[str, Any]]:
    from data.probstore import META_FILE

    tta = PredictSettings.from_config(plan.cfg).tta
    return plan.layout.store(model, "oof") / META_FILE, {"tta": tta}


def _chain_stores(plan: Plan, kind: str) -> list[Path]:
    """The stores the submission chain may start from: the blend, and the refined blend
    when refinement is on (postprocess.json says which; records.input_store)."""
    return [plan.layout.blend(kind), *([plan.layout.refined(kind)] if plan.refining else [])]


def _report_inputs(plan: Plan) -> list[Path]:
    """Everything report.py reads: the config it shows, every fold's log (curves, retries),
    every store and decision, the submission, the images and both sets of ground truth."""
    layout = plan.layout
    runs = [layout.fold(m, k) for m in plan.models for k in range(plan.n_folds)]
    return [
        layout.config,
        *(run.log for run in runs),
        *(run.retries for run in runs if run.retries.is_file()),
        *(layout.store(m, kind) for m in plan.models for kind in ("oof", "test")),
        layout.weights,
        *_chain_stores(plan, "oof"),
        *_chain_stores(plan, "test"),
        *([layout.refine_record] if plan.refining else []),
        layout.postprocess,
        layout.submission,
        *plan.images,
        *plan.masks,
        *plan.test_masks,
    ]


STAGES: tuple[Stage, ...] = (
    # pipeline.py trains the folds itself (in parallel, judging and retraining failed ones)
    Stage("train", cli.train_parser, cli.train_config),
    Stage(
        "predict",
        cli.predict_parser,
        cli.predict_config,
        argv=lambda plan, model: ["--model", model, *plan.common],
        outputs=lambda plan, model: [plan.layout.store(model, k) for k in ("oof", "test")],
        inputs=lambda plan, model: [
            *(plan.layout.fold(model, k).best for k in range(plan.n_folds)),
            *plan.images,
        ],
        record=_predict_record,
        per_model=True,
        check=_check_predict,
    ),
    Stage(
        "ensemble",
        cli.ensemble_parser,
        cli.stage_config,
        argv=lambda plan, _: ["--models", *plan.models, *plan.common, *plan.search],
        outputs=lambda plan, _: [
            plan.layout.weights,
            plan.layout.blend("oof"),
            plan.layout.blend("test"),
        ],
        inputs=lambda plan, _: [
            *(plan.layout.store(m, kind) for m in plan.models for kind in ("oof", "test")),
            *plan.masks,
        ],
        record=lambda plan, _: (
            plan.layout.weights,
            {
                "models": plan.models,
                **plan.searched("ensemble", len(plan.models) > 1),
                **plan.decide,
            },
        ),
        shown={"decide": "decide"},
    ),
    Stage(
        "refine",
        cli.refine_parser,
        cli.stage_config,
        argv=lambda plan, _: list(plan.common),
        outputs=lambda plan, _: [
            plan.layout.refine_record,
            plan.layout.refined("oof"),
            plan.layout.refined("test"),
        ],
        inputs=lambda plan, _: [
            plan.layout.blend("oof"),
            plan.layout.blend("test"),
            *plan.images,  # it crops the training and test images
            *plan.masks,
        ],
        record=lambda plan, _: (
            plan.layout.refine_record,
            {
                "settings": dataclasses.asdict(RefineSettings.from_config(plan.cfg)),
                **plan.decide,
            },
        ),
        enabled=lambda plan: plan.refining,
        shown={"settings": "refine", "decide": "decide"},
    ),
    Stage(
        "tune",
        cli.tune_parser,
        cli.stage_config,
        argv=lambda plan, _: [*plan.common, *plan.search],
        outputs=lambda plan, _: [plan.layout.postprocess],
        inputs=lambda plan, _: [
            plan.layout.blend("oof"),
            *([plan.layout.refined("oof")] if plan.refining else []),
            *plan.masks,
        ],
        record=lambda plan, _: (
            plan.layout.postprocess,
            {
                **plan.searched("tune", True),
                **plan.decide,
                "sources": ["blend", "refined"] if plan.refining else ["blend"],
            },
        ),
        shown={"decide": "decide", "sources": "sources (refine.enabled)"},
    ),
    Stage(
        "postprocess",
        cli.postprocess_parser,
        cli.stage_config,
        argv=lambda plan, _: list(plan.common),
        outputs=lambda plan, _: [plan.layout.submission],
        # the store postprocess.json names, and the test images whose sizes it writes at
        inputs=lambda plan, _: [
            plan.layout.postprocess,
            *_chain_stores(plan, "test"),
            *plan.test_images,
        ],
    ),
    Stage(
        "report",
        cli.report_parser,
        cli.stage_config,
        argv=lambda plan, _: list(plan.common),
        outputs=lambda plan, _: [plan.layout.report, plan.layout.scores],
        inputs=lambda plan, _: _report_inputs(plan),
        check=_check_report,
    ),
    Stage("hpo", cli.hpo_parser, cli.hpo_config),
)


def pipeline_configs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """pipeline.py's config, and each trained model's as train.py resolves it (its recipe)."""
    cfg = cli.stage_config(args)
    return cfg, {
        name: cli.checked(resolve_cli_config(args, model=name)) for name in model_names(cfg)
    }


# Commands that are not stages: they compose or compare them.
TOOLS: dict[str, Command] = {
    tool.name: tool
    for tool in (
        Command("pipeline", cli.pipeline_parser, pipeline_configs),
        Command("compare", cli.compare_parser),
        Command("export", cli.export_parser, cli.stage_config),
        Command("infer", cli.infer_parser),
    )
}


def commands() -> dict[str, Command]:
    """Every command by name, the stages first. Read from the table at each call, so that
    a stage added to it (a test's fixture stage) is answered like the others."""
    return {**{stage.name: stage for stage in STAGES}, **TOOLS}


def parser(name: str) -> argparse.ArgumentParser:
    """The command line of stage or tool `name`."""
    return commands()[name].parser()


def preflight(name: str) -> None:
    """Answer `--help`, and refuse a bad command line or config in one line (exit 2), before
    the command imports torch: a typo in a key waited 5-10 s for it. Model and encoder
    checks, which need the model libraries, stay with the command. From here until its
    `main` runs, Ctrl-C is one line too (invocation.quiet_start)."""
    invocation.quiet_start(name)
    command = commands()[name]
    try:
        if command.config is not None:
            # the file and its --set first, so `train.py --set train.epocs=3` names the key
            # even before argparse asks for the command's required flags
            given, _ = _config_flags().parse_known_args()
            apply_overrides(load_config(given.config), given.set)
        args = command.parser().parse_args()
        if command.config is not None:
            command.config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _config_flags() -> argparse.ArgumentParser:
    """The flags every config-reading command shares, alone (no abbreviations: `--out`
    of export.py must not read as `--out-dir`)."""
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_config_arguments(flags)
    return flags
