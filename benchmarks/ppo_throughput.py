"""PPO-ptx throughput and peak memory: LoRA against full fine-tuning on the embedded SmolLM2-135M-Instruct.

Each variant runs the real PPO stage (the trainer of :func:`selfcorrect.recipes.ppo.build_trainer`, then its
``train``) in its own subprocess, so that the peak memory is that variant's alone:

* **full** -- no ``lora`` section: the whole policy and value model are trained, and the trainer keeps a frozen
  deep copy of the policy as the reference policy for the KL penalty;
* **lora** -- ``lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}``: only the adapters of the
  policy and of the value model (plus the value model's scalar head) are trained, and the reference policy is
  the policy with its adapters disabled.

In both, the reward is a cheap Python function (the share of letters in the response, written into a temporary
module and given as ``ppo.reward_model: "module:function"``), so nothing depends on SFT or reward-stage outputs,
and the value model is a fresh scalar head on the policy's base model.

It prints, per variant: episodes/s (rollout batch size over the summed phase times of a step), the wall time of
each phase of an RLHF step from the trainer's log keys ``time/rollout`` (generation), ``time/score`` (reference
and value forward passes, reward, advantages) and ``time/update`` (the PPO-ptx optimizer steps) as means over
steps 2..N (the first step is warm-up; with ``--steps 1`` the one step is used), and the peak memory: the
process's max RSS (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` as well on CUDA. Then the ratio
LoRA / full of the peak memory, against the target of 0.6x.

Run from the repository root (a few minutes on 2 CPU cores)::

    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ppo_throughput.py
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ppo_throughput.py --steps 4 --ptx --json out/p.json

This is a benchmark script, not a test: it asserts nothing and always prints what it found.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import scratch_dir

MODEL = "embedded:smollm2-135m-instruct"
HH_FILE = "hh-rlhf/harmless-base-test.jsonl.gz"
SEED = 0
TARGET_RATIO = 0.6
VARIANTS = ("full", "lora")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
REWARD_MODULE = "ppo_bench_reward"
REWARD_SOURCE = '''"""A cheap function reward for the PPO benchmark: the share of letters in each response."""


def letter_share(prompts, responses):
    """Reward in [0, 1]: the fraction of a response's characters that are letters (0 for an empty one)."""
    return [sum(c.isalpha() for c in r) / len(r) if r else 0.0 for r in responses]
'''


# ---- the worker (one variant, in its own process) ----------------------------------------------------------------
def run_config(variant: str, args: argparse.Namespace, data_file: str, output_dir: Path) -> dict[str, Any]:
    """The run config (as a dict for YAML) of one variant."""
    hh = {"path": data_file, "format": "hh"}
    ppo: dict[str, Any] = {
        "policy": MODEL,
        "reward_model": f"{REWARD_MODULE}:letter_share",
        "prompts": {**hh, "limit": args.prompt_limit},
        "steps": args.steps,
        "save_at_steps": [],
        "save_last_every": args.steps,
        "rollout_batch_size": args.rollout_batch_size,
        "mini_batch_size": args.mini_batch_size,
        "max_prompt_length": args.max_prompt_length,
        "max_new_tokens": args.max_new_tokens,
        "gamma_ptx": 0.0,
    }
    if args.ptx:
        ptx_batch = min(args.mini_batch_size, 2)
        ppo.update(ptx_data={**hh, "limit": 64}, gamma_ptx=0.5, ptx_batch_size=ptx_batch, ptx_max_length=128)
    cfg: dict[str, Any] = {
        "name": f"ppo-bench-{variant}",
        "output_dir": str(output_dir),
        "seed": SEED,
        "model": {"name_or_path": MODEL},
        "ppo": ppo,
        "tracking": {"backend": "none"},
    }
    if variant == "lora":
        cfg["lora"] = dict(LORA)
    return cfg


def worker(variant: str, args: argparse.Namespace, out: Path) -> None:
    """Run the PPO stage of one variant and write its history, peak memory and setup to ``out`` (JSON)."""
    import torch
    import yaml

    from selfcorrect.config.run import load_run_config
    from selfcorrect.recipes.ppo import build_trainer as build_ppo_trainer

    work = scratch_dir(f"ppo-bench-{variant}-")
    (work / f"{REWARD_MODULE}.py").write_text(REWARD_SOURCE)
    sys.path.insert(0, str(work))
    output_dir = Path(args.output_dir) / variant if args.output_dir else work / "run"
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(run_config(variant, args, args.data_file, output_dir), sort_keys=False))
    cfg = load_run_config(config_path)

    torch.manual_seed(SEED)
    clock = time.perf_counter()
    trainer = build_ppo_trainer(cfg, config_path)
    history = trainer.train()
    wall = time.perf_counter() - clock
    cuda = torch.cuda.is_available()
    result = {
        "variant": variant,
        "history": history,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "reference_copy": trainer.ref_policy is not None,
        "wall_s": wall,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(result))


# ---- the driver --------------------------------------------------------------------------------------------------
def run_variant(variant: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run one variant in a child process (this script with ``--worker``) and return what it reported."""
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant, "--out", str(out)]
        cmd += ["--data-file", args.data_file]
        clock = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - clock
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"ppo_throughput: the {variant} worker failed (exit {proc.returncode})")
        result = json.loads(out.read_text())
    result["process_s"] = elapsed
    return result


def summarize(result: dict[str, Any], episodes_per_step: int) -> dict[str, float]:
    """Per-step means over steps 2..N (or the one step) of the phase times, and episodes/s."""
    history = result["history"]
    steps = history[1:] if len(history) > 1 else history
    rollout = statistics.fmean(r["time/rollout"] for r in steps)
    score = statistics.fmean(r["time/score"] for r in steps)
    update = statistics.fmean(r["time/update"] for r in steps)
    return {
        "episodes_per_s": episodes_per_step / (rollout + score + update),
        "rollout_s": rollout,
        "score_s": score,
        "update_s": update,
        "peak_rss_mb": result["max_rss_mb"],
        "cuda_peak_mb": result["cuda_max_allocated_mb"],
    }


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the table and the LoRA / full memory ratio; return the figures."""
    first = next(iter(results.values()))
    n = len(first["history"])
    window = f"means over steps 2-{n}" if n > 1 else "the one step"
    print(
        f"model {MODEL}, device {first['device']}, threads {first['threads']}, steps {n} ({window}), "
        f"{args.rollout_batch_size} episodes/step, {args.max_new_tokens} new tokens" + (", ptx on" if args.ptx else "")
    )
    cuda = first["device"] == "cuda"
    header = ["variant", "episodes/s", "rollout s", "score s", "update s", "peak RSS MB"]
    if cuda:
        header.append("CUDA peak MB")
    header.append("trainable params")
    rows = []
    summary: dict[str, Any] = {}
    for variant, result in results.items():
        s = summarize(result, args.rollout_batch_size)
        summary[variant] = {**s, "trainable_params": result["trainable_params"], "wall_s": result["wall_s"]}
        row = [variant, f"{s['episodes_per_s']:.2f}", f"{s['rollout_s']:.1f}", f"{s['score_s']:.2f}"]
        row += [f"{s['update_s']:.1f}", f"{s['peak_rss_mb']:.0f}"]
        if cuda:
            row.append(f"{s['cuda_peak_mb']:.0f}")
        row.append(f"{result['trainable_params'] / 1e6:.1f}M / {result['total_params'] / 1e6:.1f}M")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    key = "cuda_peak_mb" if cuda else "peak_rss_mb"
    if "full" in summary and "lora" in summary:
        ratio = summary["lora"][key] / summary["full"][key]
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        what = "CUDA allocated" if cuda else "RSS"
        print(f"LoRA / full peak memory ({what}): {ratio:.2f}x   (target <= {TARGET_RATIO}x: {verdict})")
        summary["lora_full_peak_ratio"] = ratio
        summary["target_met"] = ratio <= TARGET_RATIO
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options (the ``--worker``/``--out``/``--data-file`` ones are set by the driver)."""
    p = argparse.ArgumentParser(
        description="PPO-ptx throughput (episodes/s, time per phase of an RLHF step) and peak memory, LoRA against "
        "full fine-tuning, on the embedded SmolLM2-135M-Instruct with a function reward. Each variant runs in its "
        "own subprocess. Needs $SELFCORRECT_DATA_DIR (prompts from hh-rlhf/harmless-base-test.jsonl.gz).",
    )
    p.add_argument("--steps", type=int, default=3, help="RLHF steps per variant; means over steps 2..N (default 3)")
    p.add_argument("--rollout-batch-size", type=int, default=4, help="episodes per RLHF step (default 4)")
    p.add_argument("--mini-batch-size", type=int, default=2, help="episodes per optimizer step (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="generated tokens per episode (default 24)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="prompt truncation in tokens (default 128)")
    p.add_argument("--prompt-limit", type=int, default=16, help="prompts read from the HH file (default 16)")
    p.add_argument("--ptx", action="store_true", help="enable ptx (gamma_ptx 0.5) with the HH file as ptx data")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: full lora")
    p.add_argument("--output-dir", default=None, help="where the PPO runs write (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also save the figures to this JSON file")
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the variants (or, with ``--worker``, one of them) and print the comparison."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args, args.out)
        return
    from selfcorrect.config import data_dir

    root = data_dir()
    if root is None:
        raise SystemExit("ppo_throughput: set SELFCORRECT_DATA_DIR (e.g. ../shared/data)")
    args.data_file = str((root / HH_FILE).resolve())
    if not Path(args.data_file).exists():
        raise SystemExit(f"ppo_throughput: {args.data_file} not found")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {}
    for variant in args.variants:
        print(f"[{variant}] running {args.steps} PPO steps ...", file=sys.stderr, flush=True)
        results[variant] = run_variant(variant, args, argv)
        r = results[variant]
        print(f"[{variant}] done in {r['process_s']:.0f} s (train {r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    summary = report(args, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        setup = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "json")}
        payload = {"model": MODEL, "setup": setup, "summary": summary, "runs": results}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
