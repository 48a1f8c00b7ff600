"""PPO-ptx peak memory with long pretraining rows: this tree against an earlier commit, on the same config.

The config is the one a new user would try (issue 19): the embedded SmolLM2-135M-Instruct, full fine-tune in fp32,
gradient checkpointing on, 8 rollouts of at most 32 new tokens (minibatches of 4), and PPO-ptx with 16 pretraining
sequences of 512 tokens per optimizer step (``gamma_ptx: 1.0``). The pretraining texts are HH transcripts joined
into documents longer than 512 tokens, so every ptx row is full: the worst case. The reward is a cheap function.

Each tree runs the real ``selfcorrect ppo`` in its own process (the baseline from a ``git worktree`` of
``--baseline``, default the commit before the chunked LM head), and the script prints for each: the peak resident
memory (``ru_maxrss``) and the wall time; then this tree's dry-run estimate for the same config against its
measurement, and how far apart the two trees' kept checkpoints are (the largest weight difference at the last step).

Run from the repository root (about 15 minutes on 2 CPU cores; the baseline needs about 21 GB of memory)::

    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ppo_memory.py
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ppo_memory.py --baseline none   # this tree only

This is a benchmark script, not a test: it asserts nothing and always prints what it found.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's selfcorrect for the estimate, whatever the environment installed
BASELINE = "ce5b615"  # the last commit with full-vocabulary logits in PPO
HH_FILE = "hh-rlhf/harmless-base-test.jsonl.gz"
GB = 1e9
REWARD_SOURCE = '''
def length(prompts, responses):
    """A cheap reward: the response's length in tens of characters."""
    return [len(r) / 10 for r in responses]
'''
MEASURE = """
import resource, sys
import selfcorrect
from selfcorrect.cli import main
print("SELFCORRECT_FROM", selfcorrect.__file__)
code = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def long_texts(data_dir: Path, out: Path, n: int = 96, chars: int = 4000) -> Path:
    """``n`` documents of at least ``chars`` characters (well over 512 tokens), each HH transcripts end to end."""
    with gzip.open(data_dir / HH_FILE, "rt", encoding="utf-8") as f:
        transcripts = [json.loads(line)["chosen"] for line in f]
    docs, i = [], 0
    while len(docs) < n:
        doc = ""
        while len(doc) < chars:
            doc += transcripts[i % len(transcripts)]
            i += 1
        docs.append({"text": doc})
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return out


def write_config(work: Path, data_dir: Path, steps: int, chunk: int | None) -> Path:
    """The issue's long-ptx config, its output under ``work/run``."""
    (work / "mem_reward.py").write_text(REWARD_SOURCE)
    ppo = {
        "reward_model": "mem_reward:length",
        "prompts": {"path": str(data_dir / HH_FILE), "format": "hh", "limit": 64},
        "ptx_data": {"path": str(long_texts(data_dir, work / "ptx.jsonl")), "format": "text"},
        "steps": steps,
        "save_at_steps": [steps],
        "rollout_batch_size": 8,
        "mini_batch_size": 4,
        "max_prompt_length": 128,
        "max_new_tokens": 32,
        "gamma_ptx": 1.0,
        "ptx_batch_size": 16,
        "ptx_max_length": 512,
        "trainer": {"gradient_checkpointing": True},
    }
    if chunk is not None:
        ppo["logits_chunk_size"] = chunk
    config = {
        "name": "ppo-memory",
        "output_dir": str(work / "run"),
        "seed": 0,
        "model": {"name_or_path": "embedded:smollm2-135m-instruct", "dtype": "float32"},
        "ppo": ppo,
        "tracking": {"backend": "none"},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_ppo(tree: Path, config: Path) -> dict:
    """``selfcorrect ppo CONFIG`` with ``tree``'s package, in a process of its own: peak RSS, wall time, checkpoint."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(config.parent)])}
    clock = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, "ppo", str(config)], cwd=config.parent, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - clock
    source = re.search(r"SELFCORRECT_FROM (\S+)", proc.stdout)
    peak = re.search(r"MAXRSS_KB (\d+)", proc.stdout)
    return {
        "returncode": proc.returncode,
        "package": source.group(1) if source else "?",
        "peak_gb": int(peak.group(1)) * 1024 / GB if peak else None,
        "seconds": seconds,
        "error": "" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1:],
    }


def checkpoint_gap(a: Path, b: Path) -> dict[str, float]:
    """How far two checkpoints' weights are apart: the largest absolute difference, and how many weights differ by
    more than 1e-7, 1e-6 and 1e-5 (of how many)."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        return {"max": float("inf")}
    gaps = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    return {"max": float(gaps.max()), "weights": gaps.numel(),
            **{f"over_{t:g}": int((gaps > t).sum()) for t in (1e-7, 1e-6, 1e-5)}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision to compare with, or 'none' ({BASELINE})")
    parser.add_argument("--steps", type=int, default=3, help="RLHF steps per run (default 3)")
    parser.add_argument("--chunk", type=int, default=None, help="ppo.logits_chunk_size for this tree (default: its)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("SELFCORRECT_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        trees = {"this tree": (ROOT, args.chunk)}
        if args.baseline != "none":
            worktree = Path(tmp) / "baseline-tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline],
                           check=True, capture_output=True)  # fmt: skip
            trees = {f"baseline {args.baseline}": (worktree, None), **trees}
        try:
            for name, (tree, chunk) in trees.items():
                work = Path(tmp) / re.sub(r"\W+", "-", name)
                work.mkdir()
                config = write_config(work, data_dir, args.steps, chunk)
                results[name] = run_ppo(tree, config)
                results[name]["checkpoint"] = str(work / "run" / "ppo" / "checkpoints" / f"step-{args.steps:06d}")
                r = results[name]
                print(f"{name}: peak RSS {r['peak_gb']:.2f} GB, {r['seconds']:.0f} s for {args.steps} RLHF steps "
                      f"(exit {r['returncode']}; package {r['package']}) {r['error'] or ''}", flush=True)  # fmt: skip
            ours = results["this tree"]
            from selfcorrect.config.run import load_run_config
            from selfcorrect.memory import Launch, estimate_run

            estimate = estimate_run(load_run_config(config), Launch(1, None), "float32")["ppo"]
            if ours["peak_gb"]:
                gap = (estimate.total / GB - ours["peak_gb"]) / ours["peak_gb"]
                print(f"dry-run estimate {estimate.describe()}: {gap:+.0%} of this tree's measured peak")
                results["estimate_gb"] = estimate.total / GB
            if args.baseline != "none":
                base = results[f"baseline {args.baseline}"]
                if base["peak_gb"] and ours["peak_gb"]:
                    print(f"peak ratio this tree / baseline: {ours['peak_gb'] / base['peak_gb']:.2f}")
                if base["returncode"] == 0 and ours["returncode"] == 0:
                    gap = checkpoint_gap(Path(base["checkpoint"]), Path(ours["checkpoint"]))
                    counts = ", ".join(f"{v:,} over {k[5:]}" for k, v in gap.items() if k.startswith("over_"))
                    print(f"step-{args.steps} checkpoints: largest weight difference {gap['max']:.2e} "
                          f"({counts}, of {gap.get('weights', 0):,} weights)")  # fmt: skip
                    results["checkpoint_gap"] = gap
        finally:
            if args.baseline != "none":
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                               capture_output=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
