"""Every command a refusal suggests runs as printed (issue 40 item 3).

"retrain it in place with `train.py --force`" was read inside pipeline.py, which has no
--force; "train from scratch with --pretrained none" too; predict.py suggested a bare
`train.py ...` that would have trained configs/bkai.yaml, not the user's config; report.py
before any run said "unreadable ([Errno 2] ...); delete it". Here the refusals a user
meets are provoked for real, on tiny data, through each command's own `main`; every
`python X.py ...` / `python -m X ...` in what they print or log is parsed by X's own
parser, must carry the user's --config, --data-dir and --out-dir, and where it can be
run cheaply, is run.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

import data.check
import ensemble
import export
import models.weights
import pipeline
import predict
import report
import train
from tests.trainkit import write_config
from workflow import stages

# `python X.py words` or `python -m X words`, the words as shlex.join writes them: a hint
# ends at the end of its line or clause (';', ')', ', then').
WORD = r"'[^']*'|[^\s'`;),]+(?:,[^\s'`;),]+)*"
COMMAND = re.compile(rf"python (?:-m [\w.]+|[\w./-]+\.py)(?: (?:{WORD}))*")
# What the hints were before: a script or a flag named without the command line it needs.
BARE = re.compile(
    r"`\w+\.py|\b(?:re)?run (?:with )?\w+\.py\b|\(or \w+\.py\)|with --pretrained none|\[Errno"
)


def commands(text: str) -> list[list[str]]:
    """Every command named in `text`, as argv."""
    return [shlex.split(m.group(0).rstrip(".,")) for m in COMMAND.finditer(text)]


def refused(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys, caplog) -> str:
    """What a refused command printed and logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err + caplog.text


class Context:
    """A user's tiny experiment, whose config names neither the data nor the outputs: a
    hint that drops --data-dir or --out-dir would run on other folders."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.config = write_config(root, Path("/nonexistent/data"))
        cfg = yaml.safe_load(self.config.read_text())
        cfg["out_dir"] = "/nonexistent/out"
        self.config.write_text(yaml.safe_dump(cfg))
        self.data_dir, self.out_dir = data_dir, root / "runs"
        self.argv = ["--config", str(self.config), "--data-dir", str(data_dir)]
        self.argv += ["--out-dir", str(self.out_dir)]
        self.root = self.out_dir / "tiny"

    def check(self, text: str, *names: str) -> list[list[str]]:
        """The commands `text` names, each parsed by its own command's parser and holding
        this user's config flags; `names`: the commands it must name, in order."""
        assert not BARE.search(text), text
        found = commands(text)
        assert [c[1].removesuffix(".py") for c in found if c[1] != "-m"] == list(names), text
        for words in found:
            if words[1] == "-m":
                continue  # a module's own flags: run by the tests that name one
            args = parses(words)
            if hasattr(args, "config"):
                assert args.config == str(self.config), words
                assert args.data_dir == str(self.data_dir), words
                assert args.out_dir == str(self.out_dir), words
        return found


def parses(words: list[str]):
    """`python X.py ARGS` parsed by X's parser (a flag it lacks fails the test)."""
    assert words[0] == "python", words
    name = words[1].removesuffix(".py")
    try:
        return stages.parser(name).parse_args(words[2:])
    except SystemExit:
        pytest.fail(f"not a command line of {name}.py: {shlex.join(words)}")


@pytest.fixture
def user(tmp_path: Path, tiny_data: Path) -> Context:
    return Context(tmp_path, tiny_data)


def trained_elsewhere(user: Context, fold: int = 0, recipe: bool = True) -> Path:
    """A fold folder as another recipe left it (a checkpoint; its recipe.json unless
    `recipe` is False): what the recipe checks read, before any data."""
    run = user.root / "tiny" / f"fold{fold}"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"")
    if recipe:
        (run / "recipe.json").write_text(json.dumps({"recipe": {"train.lr": 0.5}}))
    return run


def test_a_report_before_any_run_says_what_to_run_first(user, capsys, caplog) -> None:
    text = refused(report.main, user.argv, capsys, caplog)
    assert "weights.json not found" in text and "Errno" not in text and "delete" not in text
    user.check(text, "pipeline")


def test_export_and_predict_before_training_name_the_commands_that_make_their_inputs(
    user, tmp_path, capsys, caplog
) -> None:
    text = refused(export.main, [*user.argv, "--out", str(tmp_path / "pkg")], capsys, caplog)
    user.check(text, "pipeline")
    text = refused(predict.main, [*user.argv, "--model", "tiny"], capsys, caplog)
    (command,) = user.check(text, "train")
    assert parses(command).fold == "all" and parses(command).model == "tiny"
    text = refused(ensemble.main, [*user.argv, "--models", "tiny"], capsys, caplog)
    user.check(text, "train", "predict")


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_a_fold_of_another_recipe_names_the_retrain_and_the_new_experiment(
    user, command, capsys, caplog
) -> None:
    """The issue's "retrain it in place with train.py --force", read in pipeline.py."""
    trained_elsewhere(user)
    main = {"train": train.main, "pipeline": pipeline.main}[command]
    extra = ["--model", "tiny", "--fold", "0"] if command == "train" else []
    text = refused(main, [*user.argv, *extra], capsys, caplog)
    assert "was trained with another recipe" in text
    retrain, keep = user.check(text, "train", command)
    assert parses(retrain).force and (parses(retrain).model, parses(retrain).fold) == ("tiny", "0")
    assert keep[2:] == [*user.argv, *extra, "--set", "experiment=tiny_v2"]


def test_a_fold_without_its_recipe_or_with_a_broken_one_names_the_same_two_ways(
    user, capsys, caplog
) -> None:
    run = trained_elsewhere(user, recipe=False)
    text = refused(pipeline.main, user.argv, capsys, caplog)
    assert "no recipe.json" in text
    user.check(text, "train", "pipeline")
    (run / "recipe.json").write_text("{")
    text = refused(pipeline.main, user.argv, capsys, caplog)
    assert "recipe.json: unreadable" in text
    user.check(text, "train", "pipeline")


def test_a_broken_split_names_a_new_split_or_a_new_experiment(user, capsys, caplog) -> None:
    user.root.mkdir(parents=True)
    (user.root / "folds.json").write_text("not json")
    argv = [*user.argv, "--model", "tiny", "--fold", "all"]
    text = refused(train.main, argv, capsys, caplog)
    assert f"delete {user.root / 'folds.json'}" in text
    (command,) = user.check(text, "train")
    assert command[2:] == [*argv, "--set", "experiment=tiny_v2"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, empty hub caches (as tests/test_pretrained.py)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_imagenet_weights_offline_name_the_from_scratch_command_of_the_pipeline(
    user, offline, capsys, caplog
) -> None:
    """The issue's "train from scratch with --pretrained none", read in pipeline.py."""
    argv = [*user.argv, "--set", "models.tiny.pretrained=imagenet"]
    text = refused(pipeline.main, argv, capsys, caplog)
    assert "could not load ImageNet weights" in text
    (command,) = user.check(text, "pipeline")
    assert command[2:] == [*argv, "--set", "models.tiny.pretrained=none"]


def test_a_missing_weights_file_names_the_flag_typed_not_a_set_it_would_beat(
    user, tmp_path, capsys, caplog
) -> None:
    argv = [*user.argv, "--model", "tiny", "--fold", "0", "--pretrained", str(tmp_path / "x.pt")]
    text = refused(train.main, argv, capsys, caplog)
    (command,) = user.check(text, "train")
    assert parses(command).pretrained == "none"


def test_a_missing_offline_encoder_names_the_models_weights_command_that_writes_it(
    user, tmp_path, capsys, caplog
) -> None:
    encoders = tmp_path / "encoders"
    argv = [*user.argv, "--model", "tiny", "--fold", "0", "--set", f"pretrained_dir={encoders}"]
    argv += ["--set", "models.tiny.pretrained=imagenet"]
    text = refused(train.main, argv, capsys, caplog)
    (command,) = commands(text)
    assert command[:3] == ["python", "-m", "models.weights"]
    # it runs as printed (--random-init: the same file, without the network)
    assert models.weights.main([*command[3:], "--random-init"]) == 0
    assert (encoders / "tiny.safetensors").is_file()


def test_a_long_list_of_data_problems_names_the_check_that_lists_them_all(
    user, tiny_data_copy, capsys, caplog
) -> None:
    images = tiny_data_copy / "train"
    source = next(images.iterdir())
    for i in range(25):
        (images / f"unpaired{i:02d}{source.suffix}").write_bytes(source.read_bytes())
    argv = [*user.argv[:2], "--data-dir", str(tiny_data_copy), *user.argv[4:]]
    text = refused(train.main, [*argv, "--model", "tiny", "--fold", "0"], capsys, caplog)
    assert "... and 5 more" in text
    (command,) = commands(text)
    assert command[:3] == ["python", "-m", "data.check"]
    assert data.check.main(command[3:]) == 1  # it runs, and lists all 25
    assert capsys.readouterr().out.count("unpaired") >= 25


def test_a_machine_without_slurm_names_the_local_run_of_the_same_command(
    user, tmp_path, monkeypatch, capsys, caplog
) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    argv = [*user.argv, "--launcher", "slurm"]
    text = refused(pipeline.main, argv, capsys, caplog)
    (command,) = user.check(text, "pipeline")
    assert command[2:] == [*argv, "--launcher", "local"] and parses(command).launcher == "local"
