"""Data-parallel evaluation: ``selfcorrect evaluate`` in 1 process and under ``accelerate launch`` with N processes.

The same items both ways (the embedded SmolLM2-135M-Instruct, a seeded stratified subsample of BBQ and law school
under Q and Q+IF, and a few Winogender CoT items), each run in a fresh output directory; it prints the wall time
(process start to exit, model loading included) and items/s of each, their ratio, and whether the two metrics.csv
are byte-identical (else the largest difference of a value). On CPUs each process gets ``cores / N`` threads
(``OMP_NUM_THREADS``; the 1-process run gets all cores), so the N-process run must not be slower than the 1-process
one; on N GPUs it should approach N times faster (``--device-config`` names an accelerate config file with
``num_processes: N`` for GPUs).

    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_parallel.py --processes 2
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_parallel.py --limit 400 --json out/p.json

It measures and prints; it asserts nothing. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2, help="processes of the parallel run (default 2)")
    p.add_argument("--limit", type=int, default=200, help="items per benchmark and condition (default 200)")
    p.add_argument("--cot-limit", type=int, default=4, help="Winogender CoT items (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--device-config", type=Path, default=None,
                   help="an accelerate config for the parallel run (default: CPU processes over gloo)")  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=None, help="output directories and logs (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    return p.parse_args(argv)


def command(args: argparse.Namespace, model: str, out: Path, processes: int, what: list[str]) -> list[str]:
    launch = [sys.executable, "-m", "selfcorrect"]
    if processes > 1:
        config = args.device_config or CPU_CONFIG
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                  "--num_processes", str(processes), "-m", "selfcorrect"]  # fmt: skip
    return [*launch, "evaluate", model, "--output", str(out), "--batch-size", str(args.batch_size),
            "--bootstrap", "100", *what]  # fmt: skip


def largest_difference(a: list[str], b: list[str]) -> float:
    """The largest absolute difference between the numbers of two lists of metrics tables (inf if they differ in
    shape or in a non-numeric cell)."""
    import csv
    import io
    import math

    rows = [[row for text in tables for row in csv.reader(io.StringIO(text))] for tables in (a, b)]
    if len(rows[0]) != len(rows[1]):
        return math.inf
    largest = 0.0
    for x, y in (pair for r, s in zip(*rows) for pair in zip(r, s)):
        if x == y:
            continue
        try:
            largest = max(largest, abs(float(x) - float(y)))
        except ValueError:
            return math.inf
    return largest


def main(argv: list[str] | None = None) -> int:
    from selfcorrect.models import prepare_embedded

    args = parse_args(argv)
    harness.exit_on_sigterm()
    work = args.work_dir or harness.scratch_dir("eval-parallel-")
    work.mkdir(parents=True, exist_ok=True)
    harness.log(f"work directory {work}; {harness.machine_note()}")
    model = args.model or str(prepare_embedded())
    cot = work / "short_cot.yaml"
    cot.write_text("name: short_cot\ncot_sampling:\n  max_new_tokens: 32\n")
    parts = [  # (what, items): the Q-type conditions of BBQ and law school, then a few Winogender CoT items
        (["--benchmarks", "bbq,law_school", "--conditions", "q,q_if", "--limit", str(args.limit)], 4 * args.limit),
        (["--benchmarks", "winogender", "--conditions", "q_if_cot", "--limit", str(args.limit), "--cot-limit",
          str(args.cot_limit), "--prompts", str(cot)], args.cot_limit),
    ]  # fmt: skip
    threads = os.cpu_count() or 1
    rows, figures = [], {}
    for processes in (1, args.processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
        if args.device_config is None:
            env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(max(1, threads // processes)))
        wall, items = 0.0, 0
        for i, (what, n) in enumerate(parts):
            out = work / f"{processes}proc" / f"part{i}"
            harness.log(f"{processes} process(es): evaluate {' '.join(what)}")
            run = harness.measure(command(args, model, out, processes, what), work / f"{processes}proc-{i}.log", env)
            harness.check(run, f"evaluate with {processes} process(es)")
            wall, items = wall + run.wall_s, items + n
        figures[processes] = {"wall_s": wall, "items": items, "items_per_s": items / wall}
        rows.append([f"{processes} process(es)", f"{wall:.1f}", str(items), f"{items / wall:.2f}"])
    harness.print_table(["run", "wall s", "items", "items/s"], rows)
    one, many = figures[1], figures[args.processes]
    tables = [[(work / f"{n}proc" / f"part{i}" / "metrics.csv").read_text() for i in range(len(parts))]
              for n in (1, args.processes)]  # fmt: skip
    same, largest = tables[0] == tables[1], largest_difference(tables[0], tables[1])
    print(f"wall time {args.processes} processes / 1 process: {many['wall_s'] / one['wall_s']:.2f}x; "
          f"metrics.csv byte-identical: {'yes' if same else 'no'}; largest difference of a value or CI bound: "
          f"{largest:.2g} (the runs' thread counts differ, and with them the order of fp32 sums)")  # fmt: skip
    harness.write_json(args.json, {"settings": {k: str(v) for k, v in vars(args).items()}, "figures": figures,
                                   "metrics_identical": same, "largest_difference": largest,
                                   "machine": harness.machine_note()})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
