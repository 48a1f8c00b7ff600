"""Side by side: the reward selfcorrect's PPO and TRL 1.12's PPOTrainer gain, and how far each moves the policy for it.

Both tools train the same policy against the same trained reward model with the same settings, for several seeds:

* **the reward model**: ``selfcorrect reward`` on the local HH harmless-base slice, from the embedded
  SmolLM2-135M-Instruct, in its chat template (``--rm-steps`` optimizer steps, default 24), made once and cached;
  its normalising bias (InstructGPT's demonstrations-at-zero) shifts selfcorrect's scores by a constant that TRL's do
  not have, so the two tools' reward *levels* differ while their gains do not;
* **the prompts**: the first ``steps x batch`` HH prompts that fit ``--max-prompt-length`` tokens in that chat
  template; selfcorrect reads them as messages, TRL as the very token ids selfcorrect computes;
* **PPO**: the embedded model (full fine-tune, fp32), value model from the reward model, ``--steps`` RLHF steps of
  ``--batch`` prompts, at most ``--max-new-tokens`` sampled tokens at temperature 1, 1 PPO epoch, 1 minibatch, a
  constant learning rate ``--learning-rate``, Adam betas (0.9, 0.95), fixed ``--kl-coef``, no ptx term.

Per tool it prints, as mean ± standard deviation over the seeds: the reward gain (the mean score of the last quarter
of the steps minus that of the first quarter), the final KL (the mean sequence KL of the last quarter, in nats:
selfcorrect's ``kl``, TRL's ``objective/kl``, both the sum over the response of log pi - log pi_ref) and the reward
gained per nat of KL. ``--set KEY=VALUE`` changes a key of selfcorrect's ``ppo:`` section (``trainer.adam_beta2=0.999``,
``whiten_advantages=false``...) for an ablation; ``--skip-anchor`` runs selfcorrect only; ``--png`` draws both curves.
With ``--work-dir``, each finished (tool, seed) run leaves ``<tool>-seed<N>.history.json``
there, and a rerun with the same settings reuses it instead of training again (a long comparison survives an
interruption).

    .venv/bin/python benchmarks/compare_learning.py --seeds 0 1 2 --json out/learning.json --png out/learning.png

It measures and prints; it asserts nothing. Progress goes to stderr, the table to stdout.
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
from compare_ppo import HERE, HH_FILE, TRL_PACKAGES, TRL_STEPS, TRL_VENV, base_env

DIALOGUE = "chat_template"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32, help="RLHF steps per run (default 32)")
    p.add_argument("--batch", type=int, default=8, help="prompts per RLHF step (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument("--max-prompt-length", type=int, default=128, help="longer prompts are skipped (default 128)")
    p.add_argument("--learning-rate", type=float, default=3e-5, help="default 3e-5")
    p.add_argument("--kl-coef", type=float, default=0.05, help="default 0.05")
    p.add_argument("--rm-steps", type=int, default=24, help="reward-model optimizer steps (default 24)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a key of selfcorrect's ppo section to change (dots: nested), e.g. trainer.adam_beta2=0.999",
    )
    p.add_argument("--png", type=Path, default=None, help="also draw the reward and KL curves of both tools")
    harness.add_common_arguments(p, "TRL", "configs, logs and run outputs (default: a temp dir)")
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE as YAML) as a nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def fixtures(args: argparse.Namespace, root: Path, work: Path, py: Path) -> dict[str, Any]:
    """The policy directory, the trained reward model (made once under ``root``) and the two prompt files."""
    from anchors.ppo_fixtures import write_prompts

    from selfcorrect.dialogue import DialogueSpec
    from selfcorrect.models import prepare_embedded

    data = Path(args.data_dir or os.environ.get("SELFCORRECT_DATA_DIR") or "").expanduser().resolve()
    hh = data / HH_FILE
    if not hh.is_file():
        raise SystemExit(f"compare_learning: {hh} not found; give --data-dir or set SELFCORRECT_DATA_DIR")
    model = prepare_embedded()
    rm_run = root / f"learning-rm-{DIALOGUE}-{args.rm_steps}steps"
    if not (rm_run / "reward" / "reward_manifest.json").is_file():
        config = {
            "name": "learning-rm", "output_dir": str(rm_run), "seed": 0,
            "model": {"name_or_path": str(model), "dtype": "float32"}, "dialogue": DIALOGUE,
            "reward": {"data": {"path": str(hh), "format": "hh", "limit": 4 * args.rm_steps * 4}, "loss": "kwise",
                       "max_length": 512, "trainer": {"max_steps": args.rm_steps, "per_device_train_batch_size": 4,
                                                      "learning_rate": 1e-4}},
            "tracking": {"backend": "none"},
        }  # fmt: skip
        path = work / "reward.yaml"
        path.write_text(yaml.safe_dump(config))
        harness.log(f"reward model: selfcorrect reward {path} ({args.rm_steps} steps)")
        run = harness.measure([str(py), "-m", "selfcorrect", "reward", str(path)], work / "reward.log",
                              {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)})  # fmt: skip
        harness.check(run, "training the reward model")
    spec = DialogueSpec(format=DIALOGUE)
    prompts = write_prompts(hh, model, work, args.steps * args.batch, args.max_prompt_length, spec)
    return {"model": str(model), "reward_model": str(rm_run / "reward"), **prompts}


def reused(path: Path, setting: Any) -> list[dict] | None:
    """A finished run's per-step history saved at ``path`` for exactly ``setting``, or None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("setting") != json.loads(json.dumps(setting)):
        return None
    harness.log(f"reusing {path} (same settings)")
    return saved["history"]


def keep(path: Path, setting: Any, history: list[dict]) -> list[dict]:
    """Save a finished run's history beside its setting (atomically), for :func:`reused`; returns ``history``."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"setting": setting, "history": history}))
    tmp.replace(path)
    return history


def run_selfcorrect(args: argparse.Namespace, fx: dict[str, Any], seed: int, work: Path, py: Path) -> list[dict]:
    """``selfcorrect ppo`` with one seed: its per-step ``reward`` and ``kl``."""
    out = work / f"selfcorrect-seed{seed}"
    ppo = {
        "policy": fx["model"], "reward_model": fx["reward_model"],
        "prompts": {"path": fx["prompts_selfcorrect"], "format": "prompt"}, "steps": args.steps, "save_at_steps": [],
        "save_last_every": args.steps, "rollout_batch_size": args.batch, "mini_batch_size": args.batch,
        "ppo_epochs": 1, "max_prompt_length": args.max_prompt_length, "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0, "kl_coef": args.kl_coef, "gamma_ptx": 0.0, "learning_rate": args.learning_rate,
    }  # fmt: skip
    config = {"name": f"learning-{seed}", "output_dir": str(out), "seed": seed, "dialogue": DIALOGUE,
              "model": {"name_or_path": fx["model"], "dtype": "float32"}, "ppo": merged(ppo, overrides(args.set)),
              "tracking": {"backend": "none"}}  # fmt: skip
    done = work / f"selfcorrect-seed{seed}.history.json"
    if (history := reused(done, config)) is not None:
        return history
    path = work / f"selfcorrect-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    harness.log(f"selfcorrect seed {seed}: selfcorrect ppo {path}")
    run = harness.measure([str(py), "-m", "selfcorrect", "ppo", str(path)], work / f"selfcorrect-seed{seed}.log",
                          {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)})  # fmt: skip
    harness.check(run, f"selfcorrect ppo (seed {seed})")
    history = json.loads((out / "ppo" / "last" / "state.json").read_text())["state"]["history"]
    return keep(done, config, [{"reward": h["reward"], "kl": h["kl"]} for h in history])


def run_trl(args: argparse.Namespace, fx: dict[str, Any], seed: int, work: Path, py: Path) -> list[dict]:
    """TRL's PPOTrainer with one seed (``anchors/trl_ppo.py``): per step, ``objective/scores`` and ``objective/kl``."""
    out = work / f"trl-seed{seed}.json"
    cmd = [
        str(py), str(HERE / "anchors" / "trl_ppo.py"), "--policy", fx["model"], "--reward", fx["reward_model"],
        "--prompts", fx["prompts_trl"], "--steps", str(args.steps), "--batch", str(args.batch),
        "--max-new-tokens", str(args.max_new_tokens), "--learning-rate", str(args.learning_rate),
        "--kl-coef", str(args.kl_coef), "--seed", str(seed), "--output-dir", str(work / f"trl-seed{seed}"),
        "--out", str(out),
    ]  # fmt: skip
    done = work / f"trl-seed{seed}.history.json"
    if (history := reused(done, cmd[1:])) is not None:
        return history
    harness.log(f"TRL seed {seed}: PPOTrainer ({TRL_VENV})")
    run = harness.measure(cmd, work / f"trl-seed{seed}.log", base_env())
    harness.check(run, f"TRL PPO (seed {seed})")
    logs = [entry for entry in json.loads(out.read_text())["logs"] if "objective/kl" in entry]
    return keep(done, cmd[1:], [{"reward": entry["objective/scores"], "kl": entry["objective/kl"]} for entry in logs])


def summary(history: list[dict]) -> dict[str, float]:
    """Reward gain (last quarter minus first quarter), final KL (last quarter's mean) and reward gained per nat."""
    quarter = max(1, len(history) // 4)
    first = statistics.fmean(h["reward"] for h in history[:quarter])
    last = statistics.fmean(h["reward"] for h in history[-quarter:])
    kl = statistics.fmean(h["kl"] for h in history[-quarter:])
    return {"gain": last - first, "final_kl": kl, "gain_per_nat": (last - first) / kl if kl > 0 else float("nan"),
            "first": first, "last": last}  # fmt: skip


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:+.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:+.3f}"


def report(args: argparse.Namespace, results: dict[str, dict[int, list[dict]]]) -> dict[str, Any]:
    print(f"PPO learning, {args.steps} steps x {args.batch} prompts, <= {args.max_new_tokens} new tokens, lr "
          f"{args.learning_rate:g}, kl_coef {args.kl_coef:g}, 1 epoch, 1 minibatch, seeds {args.seeds}"
          + (f"; selfcorrect ppo {' '.join(args.set)}" if args.set else ""))  # fmt: skip
    rows, figures = [], {}
    for tool, by_seed in results.items():
        stats = [summary(h) for h in by_seed.values()]
        figures[tool] = {k: [s[k] for s in stats] for k in stats[0]}
        f = figures[tool]
        rows.append([tool, spread(f["first"]), spread(f["last"]), spread(f["gain"]), spread(f["final_kl"]),
                     spread(f["gain_per_nat"])])  # fmt: skip
    harness.print_table(["tool", "first quarter", "last quarter", "reward gain", "final KL (nats)",
                         "gain per nat"], rows)  # fmt: skip
    if "trl" in figures:
        ours = statistics.fmean(figures["selfcorrect"]["gain_per_nat"])
        theirs = statistics.fmean(figures["trl"]["gain_per_nat"])
        print(f"reward gained per nat of KL, selfcorrect / TRL: {ours / theirs:.2f}x (goal >= 1)")
    return figures


def draw(path: Path, results: dict[str, dict[int, list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tool, colour in (("selfcorrect", "tab:blue"), ("trl", "tab:orange")):
        for i, history in enumerate(results.get(tool, {}).values()):
            for ax, key in zip(axes, ("reward", "kl")):
                ax.plot([h[key] for h in history], color=colour, alpha=0.6, label=tool if i == 0 else None)
    for ax, title in zip(axes, ("mean score per step", "mean sequence KL per step (nats)")):
        ax.set_title(title)
        ax.set_xlabel("RLHF step")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root, py, work = harness.start(args, "compare-learning-")
    trl_python = None
    if not args.skip_anchor:
        trl_python, _ = harness.ensure_venv(TRL_VENV, TRL_STEPS, TRL_PACKAGES, root)
    fx = fixtures(args, root, work, py)
    results: dict[str, dict[int, list[dict]]] = {"selfcorrect": {}}
    if trl_python is not None:
        results["trl"] = {}
    for seed in args.seeds:
        results["selfcorrect"][seed] = run_selfcorrect(args, fx, seed, work, py)
        if trl_python is not None:
            results["trl"][seed] = run_trl(args, fx, seed, work, trl_python)
    figures = report(args, results)
    if args.png:
        draw(args.png, results)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "png")}
    harness.write_json(args.json, {"settings": settings, "fixtures": fx, "figures": figures, "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
