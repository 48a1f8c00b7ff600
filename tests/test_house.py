"""The house rules that keep the code readable, checked on the source: module size, which package may import which,
one owner for every file name of a run and an evaluation directory (selfcorrect.rundir). (Configs without torch:
tests/test_config.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

from selfcorrect import rundir

PACKAGE = Path(__file__).resolve().parents[1] / "selfcorrect"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 600
# The names rundir.py owns: a module that needs one of these files asks rundir for its path.
OWNED_NAMES = (
    rundir.PIPELINE_STATE,
    rundir.MANIFEST,
    rundir.REWARD_MANIFEST,
    rundir.EVALUATION,
    rundir.METRICS,
    rundir.SAMPLE,
    rundir.REPORT,
    rundir.LOCK,
)


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _imports(path: Path) -> set[str]:
    """The selfcorrect modules ``path`` imports (anywhere in it: lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("selfcorrect")}


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module's code, docstrings left out (they are prose)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_is_over_600_lines():
    long = {_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_reward_models_never_import_train():
    """reward_models/ is reward-model inference; training (train/) may use it, never the other way round."""
    found = {_name(p): sorted(m for m in _imports(p) if m.startswith("selfcorrect.train")) for p in MODULES}
    assert {k: v for k, v in found.items() if k.startswith("selfcorrect/reward_models/") and v} == {}


def test_train_and_evaluate_never_import_each_other():
    pairs = (("selfcorrect/train/", "selfcorrect.evaluate"), ("selfcorrect/evaluate/", "selfcorrect.train"))
    found = {
        _name(p): sorted(m for m in _imports(p) if m.startswith(other))
        for p in MODULES
        for mine, other in pairs
        if _name(p).startswith(mine)
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_only_rundir_spells_the_file_names_of_a_run_or_an_evaluation():
    """No path built from a file name outside rundir.py: a string of code holding one of its names as a path (no
    whitespace in it: a help text, a caption or a message that mentions a file is prose)."""
    spelled = [
        f"{_name(p)}:{line}: {text!r}"
        for p in MODULES
        if p.name != "rundir.py"
        for line, text in _code_strings(p)
        if any(name in text for name in OWNED_NAMES) and not any(c.isspace() for c in text)
    ]
    assert spelled == []
