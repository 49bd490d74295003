"""The chain's decision documents as typed records: one reader and one writer each.

`ensemble/weights.json` (`BlendRecord`, ensemble.py), `refine/refine.json`
(`RefineRecord`, refine.py) and `postprocess.json` (`PostprocessRecord`, tune.py), with
the `Decision` each holds (`decisions.choose`'s record), are read by the later stages,
the report, `compare.py`, `export.py` and the pipeline's staleness check. Each reader
indexing raw JSON in its own way gave each its own idea of an absent key and its own
error for a broken file; here a document is read once, by its record's `read(path)`,
and every failure is one `DataError` line naming the file and the command that makes it
again. `write(path)` is the only writer (atomic, `data.atomic.write_json`).

Schema: every document records `schema` (`SCHEMA`). A document without one (schema 0,
written before the records) has the same shape and is read as it is. What an older
version did not write yet takes its field's empty value, and a reader that cannot do
without it asks with `need`, which names the file and the stage that makes it again; a
key no field knows, or a schema newer than this code's, is refused the same way, never
guessed at.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from chain import lineage
from chain.postprocessing import PostprocessParams
from core.invocation import command_hint
from core.settings import layout_of
from data.atomic import write_json
from data.reader import DataError

log = logging.getLogger("records")

SCHEMA = 1

D = TypeVar("D", bound="Document")
R = TypeVar("R", bound="Record")


class Invalid(ValueError):
    """A value of a document that its field cannot hold; `where` is its key path."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}" if where else why)
        self.where, self.why = where, why

    def under(self, key: str) -> Invalid:
        return Invalid(f"{key}.{self.where}" if self.where else key, self.why)


@dataclass(frozen=True)
class Codec:
    """How one field goes from JSON (`load`, raising Invalid) and back (`dump`), and the
    value it takes in a document of an older version that lacks it (`empty`)."""

    load: Callable[[Any], Any]
    dump: Callable[[Any], Any]
    empty: Callable[[], Any]


def _same(value: Any) -> Any:
    return value


def _typed(kinds: tuple[type, ...], what: str, empty: Callable[[], Any]) -> Codec:
    def load(value: Any) -> Any:
        # JSON's true is no count and no number
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise Invalid("", f"expected {what}, got {reprlib.repr(value)}")
        return value

    return Codec(load, _same, empty)


TEXT = _typed((str,), "a string", str)
COUNT = _typed((int,), "a whole number", int)
NUMBER = _typed((int, float), "a number", float)
FLAG = _typed((bool,), "true or false", bool)
# free-form sections no reader looks inside (provenance, a study's record, the rule),
# copied both ways: a record shares no mutable part with the dict it came from or gave
DICT = _typed((dict,), "an object", dict)
OBJECT = Codec(lambda v: copy.deepcopy(DICT.load(v)), copy.deepcopy, dict)


def optional(codec: Codec) -> Codec:
    return Codec(
        lambda v: None if v is None else codec.load(v),
        lambda v: None if v is None else codec.dump(v),
        lambda: None,
    )


def listing(codec: Codec) -> Codec:
    def load(value: Any) -> list[Any]:
        items = LIST.load(value)
        out = []
        for i, item in enumerate(items):
            try:
                out.append(codec.load(item))
            except Invalid as exc:
                raise exc.under(str(i)) from None
        return out

    return Codec(load, lambda v: [codec.dump(x) for x in v], list)


def mapping(codec: Codec) -> Codec:
    """An object of any keys, each value `codec`'s (scores by name, weights by fold)."""

    def load(value: Any) -> dict[str, Any]:
        out = {}
        for key, item in DICT.load(value).items():
            try:
                out[key] = codec.load(item)
            except Invalid as exc:
                raise exc.under(key) from None
        return out

    return Codec(load, lambda v: {k: codec.dump(x) for k, x in v.items()}, dict)


def nested(cls: type[D]) -> Codec:
    return Codec(cls.from_dict, lambda v: v.to_dict(), lambda: cls.from_dict({}))


LIST = _typed((list,), "a list", list)
SCORES = mapping(NUMBER)  # {score name: value}: metrics.scores_from_stats, decisions.pick
PARAMS = Codec(lambda v: _params(DICT.load(v)), lambda v: v.to_dict(), PostprocessParams)


def _params(value: dict[str, Any]) -> PostprocessParams:
    try:
        return PostprocessParams.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise Invalid("", str(exc)) from None


def spec(codec: Codec, *, key: str | None = None, omit: bool = False) -> dict[str, Any]:
    """A document field's metadata: its `codec`, its JSON name when that is no Python
    name (`key`), and `omit`: left out of the JSON while None or empty (the documents
    never held it then)."""
    return {"codec": codec, "key": key, "omit": omit}


@dataclass(frozen=True, kw_only=True)
class Document:
    """A typed JSON object: each field declared with `_field`, read and written in
    declaration order (the order the stages always wrote)."""

    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field[Any], str]]:
        return [
            (f, f.metadata["key"] or f.name)
            for f in dataclasses.fields(cls)
            if "codec" in f.metadata
        ]

    @classmethod
    def keys(cls) -> set[str]:
        return {key for _, key in cls._fields()}

    @classmethod
    def from_dict(cls: type[D], doc: Any) -> D:
        """The record of a JSON object; Invalid naming the key of what does not fit."""
        doc = DICT.load(doc)
        unknown = sorted(set(doc) - cls.keys())
        if unknown:
            raise Invalid("", f"unknown keys {', '.join(unknown)}")
        values = {}
        for f, key in cls._fields():
            codec: Codec = f.metadata["codec"]
            try:
                values[f.name] = codec.load(doc[key]) if key in doc else codec.empty()
            except Invalid as exc:
                raise exc.under(key) from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f, key in self._fields():
            value = getattr(self, f.name)
            if not (f.metadata["omit"] and (value is None or value == {})):
                out[key] = f.metadata["codec"].dump(value)
        return out


@dataclass(frozen=True, kw_only=True)
class DecisionRow(Document):
    """One row of a decision: its level (0: simple; each level adds a fitted component),
    its scores out of sample, the all-folds fit's in sample (only when it fits
    something), and its gain over the best simple candidate (`bootstrap_gain`: gain, low,
    high; not for that candidate itself)."""

    level: int = field(metadata=spec(COUNT))
    out_of_sample: dict[str, float] = field(metadata=spec(SCORES))
    in_sample: dict[str, float] | None = field(
        default=None, metadata=spec(optional(SCORES), omit=True)
    )
    gain_over_simple: dict[str, float] | None = field(
        default=None, metadata=spec(optional(SCORES), omit=True)
    )


@dataclass(frozen=True, kw_only=True)
class Step(Document):
    """One level of a decision: the level's best (`to`) against the current choice
    (`base`, "from" in JSON), the interval of its gain, widened for the `picked_from`
    candidates tried against it, and whether it replaced it."""

    base: str = field(metadata=spec(TEXT, key="from"))
    to: str = field(metadata=spec(TEXT))
    gain: float = field(metadata=spec(NUMBER))
    low: float = field(metadata=spec(NUMBER))
    high: float = field(metadata=spec(NUMBER))
    picked_from: int = field(metadata=spec(COUNT))
    taken: bool = field(metadata=spec(FLAG))


@dataclass(frozen=True, kw_only=True)
class Decision(Document):
    """`decisions.choose`'s record: the rule's metric, lens, confidence and adjustment,
    every candidate, the steps taken level by level, the choice and why."""

    metric: str = field(metadata=spec(TEXT))
    lens: str = field(metadata=spec(TEXT))
    confidence: float = field(metadata=spec(NUMBER))
    adjust: str = field(metadata=spec(TEXT))
    candidates: dict[str, DecisionRow] = field(metadata=spec(mapping(nested(DecisionRow))))
    steps: list[Step] = field(metadata=spec(listing(nested(Step))))
    chosen: str = field(metadata=spec(TEXT))
    reason: str = field(metadata=spec(TEXT))

    @property
    def chosen_row(self) -> DecisionRow:
        return self.candidates[self.chosen]


DECISION = nested(Decision)


@dataclass(frozen=True, kw_only=True)
class Record(Document):
    """A document of its own file, made by the stage `STAGE`; `where` and `given` say
    which file a read record came from and which keys it held (for `need`): None for a
    record made in memory."""

    STAGE: ClassVar[str]

    where: Path | None = field(default=None, compare=False, repr=False)
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """The record in `path`, or one DataError line naming it and what makes it."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{path} not found: the stage that writes it has not run yet; run it first: "
                + command_hint("pipeline")
            )
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise cls._refused(path, f"unreadable ({exc})") from exc
        if not isinstance(doc, dict):
            raise cls._refused(path, f"not a JSON object ({type(doc).__name__})")
        schema = doc.pop("schema", 0)
        if isinstance(schema, bool) or schema not in range(SCHEMA + 1):
            raise cls._refused(
                path,
                f"schema {schema!r}, which this version does not read (it reads 0 to {SCHEMA})",
            )
        doc = cls._older(doc)
        try:
            record = cls.from_dict(doc)
        except Invalid as exc:
            raise cls._refused(path, str(exc)) from None
        return dataclasses.replace(record, where=path, given=frozenset(doc))

    @classmethod
    def _older(cls, doc: dict[str, Any]) -> dict[str, Any]:
        """An older form of the document in today's (a hook: the blend and refine
        documents have none)."""
        return doc

    @classmethod
    def _refused(cls, path: Path, why: str) -> DataError:
        return DataError(f"{path}: {why}; make it again: {command_hint(cls.STAGE)}")

    def holds(self, key: str) -> bool:
        """Whether the document held `key` (a record made in memory holds every key)."""
        return self.given is None or key in self.given

    def need(self, *keys: str) -> None:
        """DataError naming the file when it lacks one of `keys`: an older version did not
        write them, and this reader cannot do without them."""
        missing = [k for k in keys if not self.holds(k)]
        if missing and self.where is not None:
            raise self._refused(
                self.where, f"no {', '.join(missing)} recorded (an older version made it)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **super().to_dict()}

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


@dataclass(frozen=True, kw_only=True)
class BlendCandidate(Document):
    """A blend candidate's weights: fitted on all folds (the test blend's) and per fold
    (fitted without it: the OOF blend's); `model` names the best single one."""

    weights: list[float] = field(metadata=spec(listing(NUMBER)))
    fold_weights: dict[str, list[float]] = field(metadata=spec(mapping(listing(NUMBER))))
    model: str | None = field(default=None, metadata=spec(optional(TEXT), omit=True))


@dataclass(frozen=True, kw_only=True)
class BlendRecord(Record):
    """`ensemble/weights.json`: the blend decision. `weights` and `fold_weights` are the
    chosen candidate's; `scores`: argmax scores by fold of each model and blend (in
    sample); `out_of_sample`: each candidate's by fold. One model: no candidates, no
    decision, no study."""

    STAGE: ClassVar[str] = "ensemble"

    models: list[str] = field(metadata=spec(listing(TEXT)))
    objective: str = field(metadata=spec(TEXT))
    decide: dict[str, Any] = field(metadata=spec(OBJECT))
    weights: list[float] = field(metadata=spec(listing(NUMBER)))
    fold_weights: dict[str, list[float]] = field(metadata=spec(mapping(listing(NUMBER))))
    chosen: str = field(metadata=spec(TEXT))
    candidates: dict[str, BlendCandidate] = field(
        default_factory=dict, metadata=spec(mapping(nested(BlendCandidate)), omit=True)
    )
    decision: Decision | None = field(default=None, metadata=spec(optional(DECISION)))
    out_of_sample: dict[str, dict[str, dict[str, float]]] = field(
        default_factory=dict, metadata=spec(mapping(mapping(SCORES)), omit=True)
    )
    trials: int = field(metadata=spec(COUNT))
    study: dict[str, Any] | None = field(default=None, metadata=spec(optional(OBJECT)))
    scores: dict[str, dict[str, dict[str, float]]] = field(metadata=spec(mapping(mapping(SCORES))))
    split_id: str | None = field(default=None, metadata=spec(optional(TEXT)))
    provenance: dict[str, Any] = field(default_factory=dict, metadata=spec(OBJECT))

    @property
    def metric(self) -> str:
        """The metric the decision was made on (its tables show it)."""
        return str(self.decide.get("metric", "competition"))


@dataclass(frozen=True, kw_only=True)
class MaskChoice(Document):
    """refine.py's own decision: the refined mask or the first stage's, under the refined
    classes."""

    kept: bool = field(metadata=spec(FLAG))
    reason: str = field(metadata=spec(TEXT))
    decision: Decision = field(metadata=spec(DECISION))


@dataclass(frozen=True, kw_only=True)
class ChangedRegion(Document):
    """One of the regions the refiner changed most (drawn in the report): its image, its
    window (y0, y1, x0, x1 at working size), the pixels changed, its true label."""

    id: str = field(metadata=spec(TEXT))
    box: list[int] = field(metadata=spec(listing(COUNT)))
    changed_pixels: int = field(metadata=spec(COUNT))
    true_label: int | None = field(metadata=spec(optional(COUNT)))


@dataclass(frozen=True, kw_only=True)
class RefineRecord(Record):
    """`refine/refine.json`: the refined maps against the blend after the lens (for
    information: tune.py decides whether they are used), the refined-mask decision, the
    OOF scores at argmax before and after, per fold, and the settings."""

    STAGE: ClassVar[str] = "refine"

    vs_blend: Decision = field(metadata=spec(DECISION))
    decide: dict[str, Any] = field(metadata=spec(OBJECT))
    oof_before: dict[str, float] = field(metadata=spec(SCORES))
    oof_after: dict[str, float] = field(metadata=spec(SCORES))
    per_fold: list[dict[str, Any]] = field(metadata=spec(listing(OBJECT)))
    refined_mask: MaskChoice = field(metadata=spec(nested(MaskChoice)))
    regions: dict[str, int] = field(metadata=spec(mapping(COUNT)))
    most_changed: list[ChangedRegion] = field(metadata=spec(listing(nested(ChangedRegion))))
    settings: dict[str, Any] = field(metadata=spec(OBJECT))
    seconds_oof: float = field(metadata=spec(NUMBER))
    split_id: str | None = field(default=None, metadata=spec(optional(TEXT)))
    seconds: float = field(default=0.0, metadata=spec(NUMBER))
    provenance: dict[str, Any] = field(default_factory=dict, metadata=spec(OBJECT))
    made_from: dict[str, str] = field(
        default_factory=dict, metadata=spec(mapping(TEXT), key=lineage.KEY)
    )


@dataclass(frozen=True, kw_only=True)
class PostprocessRecord(Record):
    """`postprocess.json`: the chain tune.py chose out of sample, the maps it starts from
    (`source`: "blend" or "refined") and their post-processing (`params`), the decision,
    the chosen chain's per-image stats (`oos_image_stats`, (N, 9), aligned with
    `image_ids`: compare.py pairs experiments by them), the all-folds fit and its
    pieces, and the OOF stores it was tuned on (`made_from`)."""

    STAGE: ClassVar[str] = "tune"

    params: PostprocessParams = field(metadata=spec(PARAMS))
    source: str = field(
        metadata=spec(Codec(TEXT.load, _same, lambda: "blend"))
    )  # what it always was
    sources: list[str] = field(metadata=spec(listing(TEXT)))
    chosen: str = field(metadata=spec(TEXT))
    decision: Decision = field(metadata=spec(DECISION))
    objective: str = field(metadata=spec(TEXT))
    decide: dict[str, Any] = field(metadata=spec(OBJECT))
    scores: dict[str, dict[str, float]] = field(metadata=spec(mapping(SCORES)))
    out_of_sample: dict[str, dict[str, float]] = field(metadata=spec(mapping(SCORES)))
    oos_image_stats: list[list[int]] = field(metadata=spec(listing(listing(COUNT))))
    tuned_params: PostprocessParams = field(metadata=spec(PARAMS))
    fold_params: dict[str, PostprocessParams] = field(metadata=spec(mapping(PARAMS)))
    tuned_params_by_source: dict[str, PostprocessParams] = field(metadata=spec(mapping(PARAMS)))
    searched_params: PostprocessParams = field(metadata=spec(PARAMS))
    ablation: list[dict[str, Any]] = field(metadata=spec(listing(OBJECT)))
    trials: int = field(metadata=spec(COUNT))
    study: dict[str, Any] | None = field(metadata=spec(optional(OBJECT)))
    n_images: int = field(metadata=spec(COUNT))
    resolution: list[int] = field(metadata=spec(listing(COUNT)))
    seed: int = field(metadata=spec(COUNT))
    image_ids: list[str] = field(default_factory=list, metadata=spec(listing(TEXT)))
    provenance: dict[str, Any] = field(default_factory=dict, metadata=spec(OBJECT))
    made_from: dict[str, str] = field(
        default_factory=dict, metadata=spec(mapping(TEXT), key=lineage.KEY)
    )

    @classmethod
    def _older(cls, doc: dict[str, Any]) -> dict[str, Any]:
        """Bare parameters (what `postprocess.py --params` has always read too) are the
        parameters of a document that says nothing else."""
        names = {f.name for f in dataclasses.fields(PostprocessParams)}
        bare = bool(doc) and "params" not in doc and set(doc) <= names
        return {"params": doc} if bare else doc

    @property
    def metric(self) -> str:
        return str(self.decide.get("metric", "competition"))


def load_params(path: Path) -> PostprocessParams:
    """The post-processing of a `postprocess.json` (or a file of bare parameters): plain
    argmax, with a warning, while tune.py has not run."""
    if not path.is_file():
        log.warning(
            "%s not found: using plain argmax (tune post-processing with %s)",
            path,
            command_hint("tune"),
        )
        return PostprocessParams()
    return PostprocessRecord.read(path).params


def input_store(cfg: dict[str, Any], kind: str) -> tuple[Path, str]:
    """The probability store the submission chain starts from, and why that one.

    tune.py decides between the blend and the refined blend (judged out of sample after
    each one's own post-processing) and records it in `postprocess.json` (`source`): the
    one place that decides, so the tuned parameters and the submission never read
    different stores. Before tune.py has run, the blend.
    """
    layout = layout_of(cfg)
    path = layout.postprocess
    if not path.is_file():
        return layout.blend(kind), f"no {path.name} yet (make it: {command_hint('tune')})"
    tuned = PostprocessRecord.read(path)
    stores = {"blend": layout.blend(kind), "refined": layout.refined(kind)}
    if tuned.source not in stores:
        raise PostprocessRecord._refused(path, f"unknown source {tuned.source!r}")
    return stores[tuned.source], f"tune.py chose {tuned.chosen or tuned.source}"
