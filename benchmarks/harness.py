"""Shared helpers of the side-by-side benchmarks (``compare_ppo.py``, ``compare_eval.py``).

* :func:`ensure_venv` builds an anchor tool (TRL, lm-eval) in its own virtualenv under a cache directory on first
  use and reuses it afterwards;
* :func:`measure` runs one command as a child process and measures its wall clock and peak memory;
* :func:`print_table` prints the result table.

Nothing here imports selfcorrect or the anchors: the driver scripts only launch processes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = Path("~/.cache/selfcorrect/bench-venvs")
CACHE_ENV = "SELFCORRECT_BENCH_VENVS"
TORCH_PIN = "torch==2.13.0"
SAMPLE_INTERVAL_S = 0.1


def add_common_arguments(parser: Any, anchor: str, work_dir_help: str) -> None:
    """The flags every side-by-side script shares: model, data, the anchor's venv, outputs."""
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model, converted once)")
    parser.add_argument("--data-dir", default=None, help="shared data directory (default: $SELFCORRECT_DATA_DIR)")
    parser.add_argument("--skip-anchor", action="store_true", help=f"run selfcorrect only (no {anchor} venv, no ratio)")
    parser.add_argument(
        "--cache-dir", default=None, help=f"anchor venvs and fixtures (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR})"
    )
    parser.add_argument("--selfcorrect-python", default=None, help="interpreter with selfcorrect's dependencies")
    parser.add_argument("--work-dir", type=Path, default=None, help=work_dir_help)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    parser.add_argument(
        "--from-json", type=Path, default=None, metavar="FILE", help="print the table of a --json file; run nothing"
    )


def log(message: str) -> None:
    """A progress line on stderr (stdout is kept for the final table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cache_dir(flag: str | None) -> Path:
    """The venv cache: ``--cache-dir``, else ``$SELFCORRECT_BENCH_VENVS``, else ``~/.cache/selfcorrect/bench-venvs``."""
    return Path(flag or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser().resolve()


def selfcorrect_python(flag: str | None) -> Path:
    """The interpreter that runs selfcorrect: ``--selfcorrect-python``, else this repository's ``.venv``, else the
    interpreter running this script."""
    if flag:
        return Path(flag)
    for candidate in (REPO_ROOT / ".venv/bin/python", Path("/work/main/.venv/bin/python")):
        if candidate.exists():
            return candidate
    return Path(sys.executable)


# ---- anchor virtualenvs --------------------------------------------------------------------------------------------


def package_versions(python: Path, names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of ``names`` in the environment of ``python`` (None where missing)."""
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\nfor n in sys.argv[1:]:\n"
        "    try:\n        out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError:\n"
        "        out[n] = None\nprint(json.dumps(out))"
    )
    proc = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def ensure_venv(name: str, steps: Sequence[Sequence[str]], report: Sequence[str], root: Path) -> tuple[Path, dict]:
    """The python of the anchor venv ``root/name`` and its package versions; built on first use.

    ``steps`` are pip install argument lists run one after the other (the first pins torch, so that later steps keep
    the local CPU build instead of pulling CUDA wheels). A finished build writes ``bench-venv.json`` (the steps and
    the versions of the ``report`` packages); a venv without it, or built with other steps, is built again. pip's
    output goes to ``root/name/install.log``.
    """
    venv = root / name
    python = venv / "bin" / "python"
    marker = venv / "bench-venv.json"
    wanted = [list(s) for s in steps]
    if marker.exists() and python.exists():
        record = json.loads(marker.read_text())
        if record.get("steps") == wanted:
            log(f"anchor venv {name}: reusing {venv}")
            return python, record["versions"]
        log(f"anchor venv {name}: built with other packages, rebuilding")
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"anchor venv {name}: building {venv} (first use; several minutes), pip log in {venv}/install.log")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    with open(venv / "install.log", "w") as out:
        for args in wanted:
            log(f"anchor venv {name}: pip install {' '.join(args)}")
            cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise SystemExit(f"anchor venv {name}: pip install {' '.join(args)} failed; see {venv}/install.log")
    versions = package_versions(python, report)
    marker.write_text(json.dumps({"steps": wanted, "versions": versions, "built": time.ctime()}, indent=2) + "\n")
    return python, versions


# ---- running and measuring a process -------------------------------------------------------------------------------


@dataclass
class Measured:
    """What :func:`measure` found for one child process (and its descendants)."""

    cmd: list[str]
    returncode: int
    wall_s: float  # from just before the process was started to its exit
    peak_tree_rss_mb: float  # largest sum of RSS over the process and its descendants, sampled every 0.1 s
    max_rss_mb: float  # the kernel's ru_maxrss of the process tree (the largest single process; exact)
    log_path: str
    loadavg_before: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    loadavg_after: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    @property
    def peak_rss_mb(self) -> float:
        """The peak memory reported in the tables: the larger of the sampled tree sum and the kernel's maximum."""
        return max(self.peak_tree_rss_mb, self.max_rss_mb)

    def as_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict."""
        return {**asdict(self), "peak_rss_mb": self.peak_rss_mb}


def _tree_rss(proc: psutil.Process) -> int:
    """RSS in bytes of a process and all its descendants (those that vanish meanwhile are skipped)."""
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Measured:
    """Run ``cmd`` to completion with its stdout and stderr in ``log_path``; measure wall clock and peak memory.

    Peak memory two ways: a sampler thread sums the RSS of the process tree every 0.1 s (catches several processes
    alive at once, may miss a short spike), and ``os.wait4`` gives the kernel's ``ru_maxrss`` of the child and its
    waited-for descendants (exact, but the largest single process, not a sum).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()
    with open(log_path, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env=dict(env) if env else None, cwd=cwd
        )
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            try:
                proc = psutil.Process(child.pid)
            except psutil.Error:
                return
            while not done.is_set():
                peak = max(peak, _tree_rss(proc))
                done.wait(SAMPLE_INTERVAL_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM (see exit_on_sigterm): do not leave the child running
            child.kill()
            child.wait()
            done.set()
            raise
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return Measured(
        cmd=[str(c) for c in cmd],
        returncode=child.returncode,
        wall_s=wall,
        peak_tree_rss_mb=peak / 2**20,
        max_rss_mb=usage.ru_maxrss / 1024,  # Linux: KiB
        log_path=str(log_path),
        loadavg_before=before,
        loadavg_after=os.getloadavg(),
    )


def start(args: Any, prefix: str) -> tuple[Path, Path, Path]:
    """What every side-by-side run does first: SIGTERM handled, and its venv cache, selfcorrect's interpreter and its
    work directory (``--work-dir``, kept, or a new temporary one named with ``prefix``, removed at exit), logged."""
    exit_on_sigterm()
    root = cache_dir(args.cache_dir)
    python = selfcorrect_python(args.selfcorrect_python)
    work = args.work_dir or scratch_dir(prefix)
    work.mkdir(parents=True, exist_ok=True)
    log(f"work directory {work}; {machine_note()}")
    return root, python, work


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory, removed when the script exits (its models and checkpoints take gigabytes)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)
    return work


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that :func:`measure` kills the running child before the driver exits."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def check(run: Measured, what: str) -> None:
    """Exit with the tail of the log if ``run`` failed."""
    if run.returncode != 0:
        tail = Path(run.log_path).read_text(errors="replace")[-4000:]
        sys.stderr.write(tail + "\n")
        raise SystemExit(f"{what} failed (exit {run.returncode}); full log: {run.log_path}")


# ---- output ----------------------------------------------------------------------------------------------------------


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain aligned table on stdout: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip())


def machine_note() -> str:
    """CPU count and load averages, for the header of a result."""
    one, five, fifteen = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} {five:.2f} {fifteen:.2f}"


def load_note(runs: Sequence[Mapping[str, Any]]) -> str:
    """CPU count and the range of the 1-minute load average seen at the start and end of the measured runs."""
    loads = [r[k][0] for r in runs for k in ("loadavg_before", "loadavg_after")]
    return f"{os.cpu_count()} CPUs, 1-min load average {min(loads):.1f}-{max(loads):.1f} at the runs' starts and ends"


def write_json(path: Path | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` (if given) as indented JSON."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"figures written to {path}")
