"""The command being run, as the user typed it: what every printed hint repeats, and what
an interrupted command names as the way to resume.

A hint that names a command must run as printed. "retrain it with train.py --force" is
read inside pipeline.py, which has no --force, and a bare `python train.py ...` drops the
`--config` the user gave, so it would train configs/bkai.yaml. So every hint is rendered
here from the running command's own context: `command_hint` names another command (or
the same) with the config flags the user's command resolved (`--config`, `--data-dir`,
`--out-dir`, every `--set`, and the dedicated flags that changed the config, as `--set`);
`rerun_hint` and `rerun_with` repeat the user's own command line with a flag or setting
added (inside pipeline.py, and in the fold processes it starts, that is the pipeline's).
The context lives in a context variable set by `config.reports_environment_errors` (every
command's `main`) and `config.resolve_cli_config` (where the arguments become a config),
so the modules deep in a stage need no arguments passed down to say the right command. A
hint ends its clause (end of line, ';', ')' or ', then'), so it can be copied whole.

Interrupts: Ctrl-C (SIGINT) and SIGTERM end a command with one line, what it finished and
the command that resumes it, exit 130 or 143; SIGTERM is raised as `Terminated` in the
main thread, so the `finally` blocks that end child processes run as they do for Ctrl-C.
Inside pipeline.py a stage's interrupt goes on to the pipeline, whose line it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread runs so cleanup runs as for Ctrl-C: code that
    already stops cleanly on KeyboardInterrupt (optuna failing its running trial, torch's
    loader workers) does so for SIGTERM too."""


@dataclass
class Invocation:
    """One command call: its program (`python train.py`, `python -m data.check`), the
    arguments as given, what the user typed (these two, or in a pipeline's fold process the
    pipeline's command), how its arguments resume it, the config flags it resolved, and
    the last thing it finished."""

    program: list[str]
    argv: list[str]
    typed: list[str]
    resume: Callable[[list[str]], list[str]] | None = None
    context: list[str] | None = None
    finished: str | None = None


_CALLS: contextvars.ContextVar[tuple[Invocation, ...]] = contextvars.ContextVar(
    "neopolyp_calls", default=()
)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# Set by pipeline.py in each fold process it starts: the pipeline's own command line (JSON),
# which that process's hints and interrupt line name, as it is what the user typed.
COMMAND_ENV = "NEOPOLYP_COMMAND"


def program(module: str) -> list[str]:
    """How a user starts the command whose `main` is in `module`: `python train.py` for a
    top-level script, `python -m data.check` for a module of a package."""
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        module = spec.name if spec is not None else Path(main.__file__ or "main").stem
    return ["python", "-m", module] if "." in module else ["python", f"{module}.py"]


def _innermost_context() -> list[str]:
    for call in reversed(_CALLS.get()):
        if call.context is not None:
            return call.context
    return []


def config_file() -> str:
    """The --config the running command was given ('CONFIG' outside a command): for the
    commands that read a config file but take no other config flags (models.weights)."""
    context = _innermost_context()
    return context[1] if context[:1] == ["--config"] else "CONFIG"


def command_hint(name: str, *extra: str, config: str | Path | None = None) -> str:
    """`python NAME.py <the user's config flags> EXTRA` (`python -m NAME ...` for a dotted
    name): a command that reads the same config as the running one. With `config`, that
    file instead, with the same --data-dir and --out-dir (the --set overrides were made
    for the other file, e.g. hpo.py's search, whose best file then says them apart)."""
    context = _innermost_context()
    if config is not None:
        places = {"--data-dir", "--out-dir"}
        pairs = zip(context[::2], context[1::2], strict=True)
        context = ["--config", str(config), *(w for p in pairs if p[0] in places for w in p)]
    return command_line(name, *context, *extra)


def command_line(name: str, *argv: str) -> str:
    """`python NAME.py ARGV` as a shell reads it, for a command that takes no config flags
    (models.weights, infer.py)."""
    return shlex.join([*program(name), *argv])


def retrain_hint(fold_dir: Path) -> str:
    """The command that retrains from scratch the fold whose folder is `fold_dir`
    (`<experiment>/<model>/fold<k>`, paths.Layout.fold)."""
    fold = fold_dir.name.removeprefix("fold")
    return command_hint("train", "--model", fold_dir.parent.name, "--fold", fold, "--force")


def rerun_hint(*extra: str) -> str:
    """The command the user ran, as typed, with `extra` added (flags every config command
    takes, such as --set, since a stage may run inside pipeline.py); outside a command,
    the words 'the same command with EXTRA'."""
    calls = _CALLS.get()
    if not calls:
        return "the same command" + (f" with {shlex.join(extra)}" if extra else "")
    return shlex.join([*calls[0].typed, *extra])


def rerun_with(settings: Mapping[str, str], flags: Mapping[str, str] | None = None) -> str:
    """The user's command again with each config key of `settings` set to its value: by
    `--set KEY=VALUE`, or by the key's flag in `flags` when the user typed that flag, as a
    dedicated flag beats --set (`train.py --pretrained X` would win over a --set); typed
    again last, it wins over the first."""
    calls = _CALLS.get()
    typed = calls[0].typed if calls else []
    extra: list[str] = []
    for key, value in settings.items():
        flag = (flags or {}).get(key)
        if flag and any(w == flag or w.startswith(f"{flag}=") for w in typed):
            extra += [flag, value]
        else:
            extra += ["--set", f"{key}={value}"]
    return rerun_hint(*extra)


def stage_hint(*extra: str) -> str:
    """The running stage's own command line with `extra` added: inside pipeline.py the
    stage's (`python ensemble.py --models ... --config ...`), for a flag that only the
    stage has (--join); else what the user typed."""
    calls = _CALLS.get()
    if not calls:
        return "the same command" + (f" with {shlex.join(extra)}" if extra else "")
    return shlex.join([*calls[-1].typed, *extra])


def child_env() -> dict[str, str]:
    """The environment entry that makes a child process's hints name the command the user
    typed (pipeline.py's, not the train.py it starts); empty outside a command."""
    calls = _CALLS.get()
    return {COMMAND_ENV: json.dumps(calls[0].typed)} if calls else {}


def _typed(program: list[str], argv: list[str]) -> list[str]:
    """The command line the user typed: this one, or the parent's in a pipeline's child."""
    parent = os.environ.get(COMMAND_ENV)
    if parent:
        with contextlib.suppress(ValueError, TypeError):
            words = json.loads(parent)
            if isinstance(words, list) and all(isinstance(w, str) for w in words):
                return words
    return [*program, *argv]


def set_context(argv: Sequence[str]) -> None:
    """Record the config flags the running command resolved (config.resolve_cli_config)."""
    calls = _CALLS.get()
    if calls:
        calls[-1].context = list(argv)


def finished(what: str) -> None:
    """Record the last thing the command finished and kept ('unet fold 0: epoch 2 of 3
    saved'), which an interrupt's line reports. Inside pipeline.py it is the pipeline's."""
    calls = _CALLS.get()
    if calls:
        calls[0].finished = what


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def quiet_start(name: str) -> None:
    """Until the command's `main` runs, Ctrl-C or SIGTERM ends it with one line (exit 130
    or 143) instead of the traceback of whichever import it stopped: the heavy ones take
    seconds. For the script of command `name`, before those imports (stages.preflight)."""
    typed = _typed(program(name), sys.argv[1:])

    def stop(signum: int, frame: FrameType | None) -> None:
        how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(
            f"interrupted ({how}) while starting; run again: {shlex.join(typed)}", file=sys.stderr
        )
        raise SystemExit(EXIT_CODES[signum])

    if threading.current_thread() is threading.main_thread():
        for signum in EXIT_CODES:
            signal.signal(signum, stop)


@contextmanager
def invoked(
    module: str, argv: Sequence[str] | None, resume: Callable[[list[str]], list[str]] | None
) -> Iterator[Invocation]:
    """The context of one call of a command's `main`; the outermost one (the command the
    user typed) turns SIGTERM into `Terminated` while it runs."""
    words = list(sys.argv[1:] if argv is None else argv)
    outer = not _CALLS.get()
    prog = program(module)
    call = Invocation(prog, words, _typed(prog, words) if outer else [*prog, *words], resume)
    token = _CALLS.set((*_CALLS.get(), call))
    handle = outer and threading.current_thread() is threading.main_thread()
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    previous: dict[int, Any] = {}
    if handle:  # (quiet_start's handlers, if any, are for the imports before)
        previous = {signum: signal.signal(signum, h) for signum, h in handlers.items()}
    try:
        yield call
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _CALLS.reset(token)


def is_outermost(call: Invocation) -> bool:
    """Whether `call` is the command the user typed (not a stage pipeline.py calls)."""
    calls = _CALLS.get()
    return bool(calls) and calls[0] is call


def interrupted(call: Invocation, exc: KeyboardInterrupt) -> tuple[str, int]:
    """The line an interrupted command ends with, and its exit code (128 + the signal)."""
    signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    if call.typed != [*call.program, *call.argv]:
        command = call.typed  # a pipeline's child: the pipeline resumes it
    else:
        command = [*call.program, *(call.resume(call.argv) if call.resume else call.argv)]
    done = f"; finished: {call.finished}" if call.finished else ""
    return f"interrupted ({how}){done}; resume with: {shlex.join(command)}", EXIT_CODES[signum]
