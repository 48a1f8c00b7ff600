"""Side by side: selfcorrect's PPO stage against TRL's PPO (``trl==1.12.0``, ``trl.experimental.ppo``).

Both tools train the same policy with the same reward model on the same prompts and settings, one after the other,
each in its own process and Python environment:

* **selfcorrect** -- ``python -m selfcorrect ppo CONFIG`` with the interpreter of selfcorrect's venv and
  ``PYTHONPATH`` = this repository; CONFIG is a run config written here (``dialogue: human_assistant``, a ``ppo:``
  section with ``policy`` = the model directory and ``reward_model`` = the reward-model directory, and for the LoRA
  variant a ``lora:`` section);
* **TRL** -- ``benchmarks/anchors/trl_ppo.py`` (``PPOTrainer``/``PPOConfig`` of ``trl.experimental.ppo``) with the
  python of a virtualenv built on first use under ``--cache-dir`` (``trl-1.12.0``: ``torch==2.13.0``, then
  ``trl==1.12.0 peft`` with whatever transformers/accelerate pip resolves; the versions are printed).

Settings (the same for both): policy, reference and value model initialised from the model directory (fp32; the
embedded SmolLM2-135M-Instruct by default), a reward model made once from it with a seeded random one-label head
(also the value model's init in both tools), a rollout batch of ``--batch`` prompts per step from the local HH slice
(the first prompts of ``hh-rlhf/harmless-base-test.jsonl.gz`` that fit in ``--max-prompt-length`` tokens, one epoch
over ``steps x batch`` prompts), at most ``--max-new-tokens`` sampled tokens (temperature 1, stop at EOS), 1 PPO
epoch, 1 minibatch (the whole rollout batch), constant learning rate 1e-5, Adam betas (0.9, 0.95), KL coefficient
0.02, no ptx term, no gradient checkpointing, no checkpoints saved during the run. Variants: ``full`` (every weight
trained; the reference is a frozen copy) and ``lora`` (r=16, alpha 32, dropout 0, all linear layers; the reference is
the adapter-free policy). In TRL's LoRA variant only the policy gets adapters (``peft_config``) and the value model is
trained in full, as TRL does; selfcorrect puts adapters on the value model too.

Measurements:

* **samples/s** -- episodes per second over steps 2..N (step 1 is warm-up and left out): ``batch x (N-1)`` over the
  summed time of those steps. selfcorrect: its own per-step log (``time/rollout + time/score + time/update`` in
  ``ppo/last/state.json``); TRL: the wall clock between consecutive ``on_step_end`` callbacks of a
  ``TrainerCallback`` (the whole loop iteration). Both are wall-clock times taken inside the training process.
* **peak RSS** -- of the process tree of each run (see ``harness.measure``), including model loading.
* **wall** -- process start to exit, including imports, model loading and the final save.

Then the ratios selfcorrect / TRL of samples/s (goal >= 1.5x) and of the LoRA variant's peak RSS (goal <= 0.6x).
This script measures and prints; it asserts nothing. Progress goes to stderr, the table to stdout.

    /work/main/.venv/bin/python benchmarks/compare_ppo.py --data-dir ../shared/data --json out/ppo.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import harness
import yaml

TRL_VENV = "trl-1.12.0"
TRL_STEPS = [[harness.TORCH_PIN], ["trl==1.12.0", "peft"]]
TRL_PACKAGES = ["torch", "transformers", "accelerate", "trl", "peft", "datasets"]
HH_FILE = "hh-rlhf/harmless-base-test.jsonl.gz"
VARIANTS = ("full", "lora")
ENGINES = ("hf", "vllm")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LEARNING_RATE = 1e-5
KL_COEF = 0.02
SEED = 0
SPEED_GOAL = 1.5
MEMORY_GOAL = 0.6
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="PPO side by side: selfcorrect vs TRL 1.12 (trl.experimental.ppo), same model, reward model, "
        "prompts and settings; samples/s over steps 2..N and peak RSS, full fine-tuning and LoRA r=16.",
        epilog="The TRL virtualenv is built on first use (several minutes) and reused afterwards.",
    )
    p.add_argument("--steps", type=int, default=6, help="RLHF steps per run; speed over steps 2..N (default 6)")
    p.add_argument("--batch", type=int, default=8, help="rollout batch: prompts (episodes) per step (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="sampled tokens per episode, at most (default 32)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="longer HH prompts are skipped (default 128)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: full lora")
    p.add_argument(
        "--engines", nargs="+", choices=ENGINES, default=["hf"],
        help="selfcorrect's rollout engines, each a run per variant (vllm: selfcorrect's python needs vLLM; its rows "
        "are named VARIANT+vllm and compared with TRL's VARIANT run); default: hf",
    )  # fmt: skip
    harness.add_common_arguments(p, "TRL", "configs, logs and run outputs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.max_new_tokens < 1:
        p.error("--steps, --batch and --max-new-tokens must be positive")
    return args


def base_env() -> dict[str, str]:
    """The environment of every child: offline hub access, no tokenizer thread pools."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def selfcorrect_config(
    variant: str, engine: str, args: argparse.Namespace, fx: dict[str, Any], out: Path
) -> dict[str, Any]:
    """selfcorrect's run config for one variant and rollout engine."""
    cfg: dict[str, Any] = {
        "name": f"bench-ppo-{variant}",
        "output_dir": str(out),
        "seed": SEED,
        "model": {"name_or_path": fx["model"]},
        "dialogue": {"format": "human_assistant"},
        "ppo": {
            "policy": fx["model"],
            "reward_model": fx["reward_model"],
            "prompts": {"path": fx["prompts_selfcorrect"], "format": "prompt"},
            "steps": args.steps,
            "save_at_steps": [],
            "save_last_every": args.steps,  # resume state only at the end, outside the timed steps
            "rollout_batch_size": args.batch,
            "mini_batch_size": args.batch,  # one minibatch
            "ppo_epochs": 1,
            "max_prompt_length": args.max_prompt_length,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "kl_coef": KL_COEF,
            "gamma_ptx": 0.0,
            "learning_rate": LEARNING_RATE,
            "engine": engine,
        },
        "tracking": {"backend": "none"},
    }
    if variant == "lora":
        cfg["lora"] = dict(LORA)
    return cfg


def steady_rate(step_times: list[float], batch: int) -> tuple[float, float, str]:
    """(samples/s, mean seconds per step, window) over steps 2..N, or the one step if N == 1."""
    window = step_times[1:] if len(step_times) > 1 else step_times
    label = f"steps 2-{len(step_times)}" if len(step_times) > 1 else "step 1"
    return batch * len(window) / sum(window), statistics.fmean(window), label


def row_name(variant: str, engine: str) -> str:
    """A selfcorrect row's name: the variant, with ``+vllm`` for vLLM rollouts."""
    return variant if engine == "hf" else f"{variant}+{engine}"


def run_selfcorrect(
    variant: str, engine: str, args: argparse.Namespace, fx: dict[str, Any], work: Path, py: Path
) -> dict:
    """``selfcorrect ppo CONFIG`` for one variant and engine; its per-step times and the process measurements."""
    name = row_name(variant, engine)
    run_dir = work / f"selfcorrect-{name}"
    config = work / f"selfcorrect-{name}.yaml"
    config.write_text(yaml.safe_dump(selfcorrect_config(variant, engine, args, fx, run_dir), sort_keys=False))
    env = {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)}
    harness.log(f"selfcorrect {name}: selfcorrect ppo {config}")
    run = harness.measure([str(py), "-m", "selfcorrect", "ppo", str(config)], work / f"selfcorrect-{name}.log", env)
    harness.check(run, f"selfcorrect ppo ({name})")
    state = json.loads((run_dir / "ppo" / "last" / "state.json").read_text())["state"]
    history = state["history"]
    steps = [r["time/rollout"] + r["time/score"] + r["time/update"] for r in history]
    phases = {k: [r[f"time/{k}"] for r in history] for k in ("rollout", "score", "update")}
    return {"step_times_s": steps, "phases_s": phases, "tokens": state.get("tokens"), "run": run.as_dict()}


def run_trl(variant: str, args: argparse.Namespace, fx: dict[str, Any], work: Path, py: Path) -> dict:
    """TRL's PPOTrainer for one variant (``anchors/trl_ppo.py`` in the TRL venv)."""
    out = work / f"trl-{variant}.json"
    cmd = [
        str(py), str(HERE / "anchors" / "trl_ppo.py"),
        "--policy", fx["model"], "--reward", fx["reward_model"], "--prompts", fx["prompts_trl"],
        "--steps", str(args.steps), "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
        "--learning-rate", str(LEARNING_RATE), "--kl-coef", str(KL_COEF), "--seed", str(SEED),
        "--output-dir", str(work / f"trl-{variant}"), "--out", str(out),
    ]  # fmt: skip
    if variant == "lora":
        cmd += ["--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"])]
    harness.log(f"TRL {variant}: PPOTrainer ({TRL_VENV})")
    run = harness.measure(cmd, work / f"trl-{variant}.log", base_env())
    harness.check(run, f"TRL PPO ({variant})")
    return {**json.loads(out.read_text()), "run": run.as_dict()}


def make_fixtures(args: argparse.Namespace, root: Path, work: Path, py: Path) -> dict[str, Any]:
    """The model, reward model and prompt files (``anchors/ppo_fixtures.py`` with selfcorrect's python)."""
    data = Path(args.data_dir or os.environ.get("SELFCORRECT_DATA_DIR") or "").expanduser()
    hh = data / HH_FILE
    if not hh.is_file():
        raise SystemExit(f"compare_ppo: {hh} not found; give --data-dir or set SELFCORRECT_DATA_DIR")
    cmd = [
        str(py), str(HERE / "anchors" / "ppo_fixtures.py"), "--fixtures", str(root / "fixtures"),
        "--hh-file", str(hh), "--work", str(work), "--count", str(args.steps * args.batch),
        "--max-prompt-length", str(args.max_prompt_length), "--seed", str(SEED),
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    harness.log("fixtures: model directory, reward model (made once), prompt files")
    run = harness.measure(cmd, work / "fixtures.log", {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)})
    harness.check(run, "making the fixtures")
    return json.loads((work / "fixtures.json").read_text())


def report(args: argparse.Namespace, fx: dict[str, Any], results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Print the table and the ratios; return the summary figures."""
    rows, summary = [], {}
    for tool, by_variant in results.items():
        for variant, r in by_variant.items():
            rate, per_step, window = steady_rate(r["step_times_s"], args.batch)
            peak = r["run"]["peak_rss_mb"]
            summary[f"{tool}/{variant}"] = {
                "samples_per_s": rate, "s_per_step": per_step, "window": window,
                "wall_s": r["run"]["wall_s"], "peak_rss_mb": peak,
            }  # fmt: skip
            rows.append([tool, variant, f"{rate:.3g}", f"{per_step:.1f}", f"{r['run']['wall_s']:.0f}", f"{peak:.0f}"])
    tokens = fx["prompt_tokens"]
    runs = [r["run"] for by_variant in results.values() for r in by_variant.values()]
    print(
        f"PPO, {args.steps} steps x {args.batch} prompts (HH, {min(tokens)}-{max(tokens)} prompt tokens, mean "
        f"{statistics.fmean(tokens):.0f}), <= {args.max_new_tokens} new tokens, 1 PPO epoch, 1 minibatch, fp32; "
        f"speed over steps 2-{args.steps}; {harness.load_note(runs)}"
    )
    harness.print_table(["tool", "variant", "samples/s", "s/step", "wall s", "peak RSS MB"], rows)
    ratios: dict[str, float] = {}
    for name in results.get("selfcorrect", {}):  # each against TRL's run of the same variant
        variant = name.split("+")[0]
        a, b = summary[f"selfcorrect/{name}"], summary.get(f"trl/{variant}")
        if b:
            ratios[f"speed_{name}"] = a["samples_per_s"] / b["samples_per_s"]
            print(f"speed selfcorrect/TRL, {name}: {ratios[f'speed_{name}']:.2f}x   (goal >= {SPEED_GOAL}x)")
    for name in results.get("selfcorrect", {}):
        a, b = summary[f"selfcorrect/{name}"], summary.get("trl/lora")
        if name.startswith("lora") and b:
            ratios[f"peak_rss_{name}"] = a["peak_rss_mb"] / b["peak_rss_mb"]
            print(f"peak RSS selfcorrect/TRL, {name}: {ratios[f'peak_rss_{name}']:.2f}x   (goal <= {MEMORY_GOAL}x)")
    for variant, r in results.get("selfcorrect", {}).items():
        window = slice(1, None) if len(r["step_times_s"]) > 1 else slice(None)
        means = {k: statistics.fmean(v[window]) for k, v in r["phases_s"].items()}
        print(
            f"selfcorrect {variant} phases per step ({summary[f'selfcorrect/{variant}']['window']}): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in means.items())
        )
    return {"summary": summary, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    args = parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        vars(args).update(
            {k: v for k, v in saved["settings"].items() if k in ("steps", "batch", "max_new_tokens", "variants")}
        )
        report(args, saved["fixtures"], {k: v for k, v in saved["runs"].items() if v})
        return 0
    root, sc_python, work = harness.start(args, "compare-ppo-")
    versions = {"selfcorrect": harness.package_versions(sc_python, TRL_PACKAGES)}
    trl_python = None
    if not args.skip_anchor:
        trl_python, versions["trl"] = harness.ensure_venv(TRL_VENV, TRL_STEPS, TRL_PACKAGES, root)
    fx = make_fixtures(args, root, work, sc_python)
    results: dict[str, dict[str, dict]] = {"selfcorrect": {}, "trl": {}}
    for variant in args.variants:
        for engine in args.engines:
            run = run_selfcorrect(variant, engine, args, fx, work, sc_python)
            results["selfcorrect"][row_name(variant, engine)] = run
        if trl_python is not None:
            results["trl"][variant] = run_trl(variant, args, fx, work, trl_python)
    figures = report(args, fx, {k: v for k, v in results.items() if v})
    for tool, v in versions.items():
        print(f"{tool} env: " + ", ".join(f"{k} {v[k]}" for k in TRL_PACKAGES if v.get(k)))
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings.update(lora=LORA, learning_rate=LEARNING_RATE, kl_coef=KL_COEF, seed=SEED)
    harness.write_json(
        args.json, {"settings": settings, "fixtures": fx, "versions": versions, **figures, "runs": results}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
