"""The code's shape the experiments issue asked for: stage scripts are commands, not
libraries, every command is its script and its entry in the stage table (no other list
names it), and every artefact path comes from one Layout."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import layout_of
from workflow import stages

ROOT = Path(__file__).resolve().parent.parent
STAGES = {stage.name for stage in stages.STAGES}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_import_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    script = tmp_path / "x.py"
    script.write_text("def f():\n    import tune\n    from predict import main\n")
    assert imported_modules(script) >= {"tune", "predict"}


def command_problems(root: Path) -> list[str]:
    """How the scripts at `root` and the table (`stages.commands()`, read now) disagree: a
    script with no entry, an entry with no script, a script that does not answer `--help`
    and its config by its own name before its heavy imports, or that does not run as a
    command. Empty when the root holds exactly the table's commands."""
    commands = set(stages.commands())
    at_root = {p.stem for p in root.glob("*.py")}
    problems = [f"{n}.py: a library module at the root, or no entry" for n in at_root - commands]
    problems += [f"{n}: an entry with no {n}.py at the root" for n in commands - at_root]
    for name in at_root & commands:
        text = (root / f"{name}.py").read_text()
        if f'stages.preflight("{name}")' not in text:
            problems.append(f"{name}.py does not call stages.preflight({name!r})")
        if '__name__ == "__main__"' not in text:
            problems.append(f"{name}.py does not run as a command")
        if not stages.parser(name).prog:
            problems.append(f"{name}: no parser in the table")
    return sorted(problems)


def e402_flagged(root: Path) -> list[str]:
    """The files below `root` that ruff, with `root`'s pyproject.toml, flags with E402."""
    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run(
        [ruff, "check", "--no-cache", "--select", "E402", "--output-format", "concise", "."],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return sorted({line.split(":")[0] for line in done.stdout.splitlines() if "E402" in line})


def test_every_command_is_its_script_and_its_entry() -> None:
    assert command_problems(ROOT) == []
    assert {"train", "predict", "refine", "report"} <= STAGES
    assert {"pipeline", "export", "infer"} <= set(stages.TOOLS)


def test_the_command_check_sees_a_script_without_an_entry_and_the_reverse(tmp_path: Path) -> None:
    for name in stages.commands():
        shutil.copy(ROOT / f"{name}.py", tmp_path)
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "report.py").write_text('if __name__ == "__main__":\n    pass\n')
    (tmp_path / "infer.py").unlink()
    assert command_problems(tmp_path) == [
        "helpers.py: a library module at the root, or no entry",
        "infer: an entry with no infer.py at the root",
        "report.py does not call stages.preflight('report')",
    ]


def test_commands_need_no_lint_exemption_and_e402_holds_everywhere(tmp_path: Path) -> None:
    """A command answers --help before its heavy imports (`stages.preflight` in its
    `if __name__ == "__main__":` block): E402 lets that block stand before imports, so no
    file list exempts the commands, and a statement before an import is still flagged at
    the root as in a package."""
    assert "per-file-ignores" not in (ROOT / "pyproject.toml").read_text()
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    command = 'if __name__ == "__main__":\n    stages.preflight("anything")\n\nimport os\n'
    late = "import os\n\nos.getpid()\n\nimport sys\n"
    (tmp_path / "core").mkdir()
    for path in ("anything.py", "core/anything.py"):
        (tmp_path / path).write_text(f'"""A module."""\n\nfrom workflow import stages\n\n{command}')
    for path in ("late.py", "core/late.py"):
        (tmp_path / path).write_text(f'"""A module."""\n\n{late}')
    assert e402_flagged(tmp_path) == ["core/late.py", "late.py"]
    assert e402_flagged(ROOT) == []


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_script_imports_another(stage: str) -> None:
    others = imported_modules(ROOT / f"{stage}.py") & (STAGES - {stage})
    assert not others, f"{stage}.py imports the stage script(s) {sorted(others)}"


def test_report_and_benchmarks_do_not_import_the_train_stage() -> None:
    for path in [ROOT / "report.py", *sorted((ROOT / "bench").glob("*.py"))]:
        assert "train" not in imported_modules(path), path


# The floors, lowest first (each package's docstring says what belongs there). A module
# imports its own package and the floors below; `training` and `chain` share a floor and
# never import each other. The commands at the root stand on every floor; bench/ is
# imported by nobody (tests aside): it measures the rest.
FLOORS = {"core": 0, "data": 1, "models": 2, "training": 3, "chain": 3, "workflow": 4}
COMMANDS_FLOOR, BENCH_FLOOR = 5, 6


def project_imports(root: Path) -> dict[str, set[str]]:
    """{module: the project modules it imports, at any depth of its code}, dotted names."""
    files = [*root.glob("*.py"), *(p for d in (*FLOORS, "bench") for p in root.glob(f"{d}/*.py"))]
    names = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in files
    }
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found |= {full} if full in names else {node.module} & set(names)
        graph[name] = found - {name}
    return graph


def _floor(module: str) -> tuple[int, str]:
    """(floor, package) of a dotted module name; a root module is a command."""
    top = module.split(".")[0]
    if top == "bench":
        return BENCH_FLOOR, top
    if "." not in module and module not in FLOORS:
        return COMMANDS_FLOOR, ""
    return FLOORS[top], top


def climbs(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs to a higher floor, crosses to a sibling package on the same
    floor, reaches into bench/, and every cycle."""
    found = []
    for m, deps in sorted(graph.items()):
        (floor, package) = _floor(m)
        for d in sorted(deps):
            dep_floor, dep_package = _floor(d)
            sideways = dep_floor == floor and dep_package != package and floor < COMMANDS_FLOOR
            if dep_floor > floor or sideways:
                found.append(f"{m} -> {d}")
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append("cycle: " + " -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_every_floor_says_what_belongs_there() -> None:
    for package in FLOORS:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 10, f"{package}/__init__.py says what belongs there"


def test_no_import_climbs_back_up_and_none_goes_round() -> None:
    assert climbs(project_imports(ROOT)) == []


def test_the_layer_check_sees_climbs_sideways_steps_and_cycles(tmp_path: Path) -> None:
    for package in ("core", "data", "models", "training", "chain", "bench"):
        (tmp_path / package).mkdir()
    (tmp_path / "core" / "runtime.py").write_text("def f():\n    from data.dataset import x\n")
    (tmp_path / "data" / "dataset.py").write_text("from core.runtime import f\n")
    (tmp_path / "models" / "__main__.py").write_text("import bench.report\n")
    (tmp_path / "bench" / "report.py").write_text("")
    (tmp_path / "chain" / "decide.py").write_text("from training import engine\n")
    (tmp_path / "training" / "engine.py").write_text(
        "from data import dataset\nfrom models import x\n"
    )
    (tmp_path / "train.py").write_text("from chain import decide\nfrom training import engine\n")
    graph = project_imports(tmp_path)
    assert graph["training.engine"] == {"data.dataset"}
    assert climbs(graph) == [
        "chain.decide -> training.engine",
        "core.runtime -> data.dataset",
        "models.__main__ -> bench.report",
        "cycle: data.dataset -> core.runtime -> data.dataset",
    ]


# Modules that own a file format and name its parts themselves.
OWNERS = {"core/paths.py": "the experiment's layout", "data/probstore.py": "a probability store"}


def file_names(path: Path) -> set[str]:
    """The file names a module spells as string constants (no spaces: not messages)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names |= {w.split("/")[-1] for w in [node.value] if re.fullmatch(r"[\w./-]+", w)}
    return {n for n in names if re.fullmatch(r"\w[\w-]*\.[a-z]+", n)}


def test_no_module_spells_an_artefact_name_the_layout_owns() -> None:
    owned = {name: owner for owner in OWNERS for name in file_names(ROOT / owner)}
    assert {"best.pt", "log.jsonl", "recipe.json", "submission.csv", "meta.json"} <= set(owned)
    modules = [
        *ROOT.glob("*.py"),
        *(p for d in (*FLOORS, "bench") for p in ROOT.glob(f"{d}/*.py")),
    ]
    spelled = [
        f"{path.relative_to(ROOT)} spells {name} (owned by {owned[name]})"
        for path in sorted(modules)
        for name in sorted(file_names(path) & set(owned))
        if owned[name] != str(path.relative_to(ROOT))
    ]
    assert spelled == []


def test_the_artefact_check_sees_a_spelled_path(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        '"""Reads best.pt."""\nx = out / "best.pt"\ny = f"{out}/ensemble/weights.json"\n'
    )
    assert file_names(module) == {"best.pt", "weights.json"}


def test_layout_paths_follow_the_documented_tree(tmp_path: Path) -> None:
    layout = layout_of({"out_dir": str(tmp_path), "experiment": "exp"})
    root = tmp_path / "exp"
    assert layout.fold("unet", 2).dir == root / "unet" / "fold2"
    assert layout.fold("unet", 2).best == root / "unet" / "fold2" / "best.pt"
    assert layout.store("unet", "test") == root / "unet" / "test"
    assert layout.blend("oof") == root / "ensemble" / "oof"
    assert layout.weights.parent == layout.blend("oof").parent
    assert layout.cache == tmp_path / "cache"
    assert {layout.postprocess.parent, layout.submission.parent, layout.report.parent} == {root}


@pytest.mark.parametrize(
    "stage", ["train", "predict", "ensemble", "tune", "postprocess", "pipeline"]
)
def test_help_answers_before_the_heavy_imports(stage: str) -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{stage!r} + '.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({stage!r} + '.py', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    heavy = sorted({'torch', 'optuna', 'albumentations'} & set(sys.modules))\n"
        "    print('EXIT', exc.code, heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--config" in out and "--set" in out
    assert out.strip().endswith("EXIT 0 []")
