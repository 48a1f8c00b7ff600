"""benchmarks/gpu_check.sh --cpu: the device check's own steps, run on the CPU, so the script is known to work before a
GPU is lent (on a GPU the same script runs them on CUDA)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_runs_green_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, env={**env, "PYTHON": sys.executable},
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x[:4] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    vllm = importlib.util.find_spec("vllm") is not None
    checks = {x[5:].split(":")[0] for x in lines}
    assert checks == {
        "evaluate --engine hf", "evaluate --engine vllm", "ppo --engine hf", "ppo --engine vllm", "pytest -m gpu",
        *(["evaluate Q metrics hf = vllm"] if vllm else []),
    }, lines  # fmt: skip
    for x in lines:
        assert x.startswith("PASS") or (x.startswith("SKIP") and not vllm), x
    assert (tmp_path / "run-hf" / "ppo" / "checkpoints" / "step-000002" / "model.safetensors").is_file()
