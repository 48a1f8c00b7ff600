"""The memory estimate of `pipeline --dry-run` (selfcorrect.memory): hand-computed parts, and a measured peak."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfcorrect.cli import main
from selfcorrect.config import LoraSection
from selfcorrect.config.run import load_run_config
from selfcorrect.memory import GB, Architecture, Launch, _training_state, architecture_of, estimate_run

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SELFCORRECT_DATA_DIR", ROOT.parent / "shared" / "data"))

# SmolLM2-1.7B's config.json (the model of configs/pipelines/ganguli2023.yaml), as published with the model.
SMOLLM2_1_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 24,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}

TINY = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}


def test_parameter_counts_by_hand():
    arch = Architecture.from_config({**TINY, "num_hidden_layers": 3, "vocab_size": 100})
    # q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16, down 16x8, two norms of 8; embeddings 100x8 tied; final norm 8
    per_layer = 64 + 32 + 32 + 64 + 128 + 128 + 128 + 16
    assert arch.n_params == 100 * 8 + 3 * per_layer + 8
    assert arch.head_dim == 4 and arch.kv_heads == 1
    # LoRA r=2 on the 7 linear layers of each of 3 layers: r * (in + out)
    assert arch.lora_params(2) == 3 * 2 * ((8 + 8) + (8 + 4) * 2 + (8 + 8) + (8 + 16) * 2 + (16 + 8))
    assert arch.lora_params(2, ["q_proj", "v_proj"]) == 3 * 2 * ((8 + 8) + (8 + 4))
    untied = Architecture.from_config({**TINY, "num_hidden_layers": 3, "vocab_size": 100, "tie_word_embeddings": False})
    assert untied.n_params == arch.n_params + 100 * 8
    assert Architecture.from_config(SMOLLM2_1_7B).n_params == 1_711_376_384


def test_the_embedded_model_counts_its_weights_from_the_safetensors_headers(embedded_model_dir):
    from transformers import AutoModelForCausalLM

    arch = architecture_of("embedded:smollm2-135m-instruct")
    assert isinstance(arch, Architecture)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    assert arch.n_params == sum(p.numel() for p in model.parameters())
    assert (arch.hidden, arch.layers, arch.vocab) == (576, 30, 49152)


def test_zero_stages_split_gradients_and_optimizer_states():
    n = 1000
    assert _training_state(n, 4, Launch(1, None)) == {"gradients": 4000, "optimizer": 8000}
    assert _training_state(n, 2, Launch(8, None)) == {"gradients": 2000, "optimizer": 8000}  # DDP: no split
    assert _training_state(n, 2, Launch(8, 1)) == {"gradients": 2000, "optimizer": 12000 / 8}  # + fp32 master
    assert _training_state(n, 2, Launch(8, 2)) == {"gradients": 2000 / 8, "optimizer": 12000 / 8}


def test_launcher_configs_give_processes_and_zero_stage():
    assert Launch.from_launcher(None) == Launch(1, None)
    zero2 = "accelerate launch --config_file accelerate/deepspeed_zero2.yaml"
    assert Launch.from_launcher(zero2) == Launch(8, 2, "bf16")
    assert Launch.from_launcher(
        "accelerate launch --config_file accelerate/deepspeed_zero3.yaml --num_processes 4"
    ) == Launch(4, 3, "bf16")
    assert Launch.from_launcher("accelerate launch --config_file accelerate/cpu_2proc.yaml --mixed_precision fp16") == (
        Launch(2, None, "fp16")
    )
    # the multi-node launcher of examples/slurm/pipeline.sbatch: srun's options before accelerate's, --key=value forms
    two_nodes = f"srun --nodes=2 --ntasks-per-node=1 {zero2} --num_machines=2 --num_processes 16 --rdzv_backend c10d"
    assert Launch.from_launcher(two_nodes) == Launch(16, 2, "bf16", machines=2)


def _long_texts(path: Path, n: int = 16, chars: int = 4000) -> Path:
    """``n`` documents of HH transcripts end to end, each of at least ``chars`` characters (over 512 tokens)."""
    with gzip.open(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        transcripts = [json.loads(line)["chosen"] for _, line in zip(range(400), f)]
    docs, i = [], 0
    while len(docs) < n:
        doc = ""
        while len(doc) < chars:
            doc, i = doc + transcripts[i % len(transcripts)], i + 1
        docs.append(json.dumps({"text": doc}) + "\n")
    path.write_text("".join(docs))
    return path


def _ppo_config(tmp_path: Path, lora: bool, long_ptx: bool = False) -> Path:
    """One RLHF step on the embedded model; ``long_ptx``: full fine-tune with gradient checkpointing and 8 pretraining
    rows of 512 tokens beside the episodes (the logits of PPO-ptx, chunked)."""
    reward = "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
    (tmp_path / "mem_reward.py").write_text(reward)
    cfg = {
        "name": "mem",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "embedded:smollm2-135m-instruct", "dtype": "float32"},
        "ppo": {
            "reward_model": "mem_reward:length",
            "prompts": {"path": str(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh", "limit": 8},
            "steps": 1,
            "save_at_steps": [],
            "rollout_batch_size": 4,
            "mini_batch_size": 2,
            "max_prompt_length": 128,
            "max_new_tokens": 16,
            "gamma_ptx": 0.0,
        },
        "tracking": {"backend": "none"},
    }
    if lora:
        cfg["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    if long_ptx:
        ptx_data = {"path": str(_long_texts(tmp_path / "long.jsonl")), "format": "text"}
        cfg["ppo"].update(rollout_batch_size=2, mini_batch_size=2, gamma_ptx=1.0, ptx_data=ptx_data, ptx_batch_size=8,
                          ptx_max_length=512, trainer={"gradient_checkpointing": True})  # fmt: skip
    path = tmp_path / "mem.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# The peak of this process's own memory: VmHWM (its address space's high-water mark, new at exec), not getrusage's
# ru_maxrss, which Linux keeps across exec and so starts at the RSS of the pytest process that forked it.
MEASURE = """
import re, sys
from selfcorrect.cli import main
code = main(sys.argv[1:])
print("MAXRSS_KB", re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""


@pytest.mark.embedded
@pytest.mark.parametrize(("lora", "long_ptx"), [(False, False), (True, False), (False, True)],
                         ids=["full", "lora", "long-ptx"])  # fmt: skip
def test_ppo_estimate_within_30_percent_of_the_measured_peak(tmp_path, embedded_model_dir, lora, long_ptx):
    """The real PPO stage on the embedded 135M model (CPU, fp32, one RLHF step): its peak resident memory against
    the estimate the dry run prints for the same config."""
    config = _ppo_config(tmp_path, lora, long_ptx)
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, "ppo", str(config)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = int(re.search(r"MAXRSS_KB (\d+)", proc.stdout).group(1)) * 1024
    estimate = estimate_run(load_run_config(config), Launch(1, None), "float32")["ppo"]
    print(f"measured peak {measured / GB:.2f} GB, estimate {estimate.describe()}")
    assert abs(estimate.total - measured) / measured < 0.3, (estimate.describe(), measured / GB)


def test_dry_run_prints_the_estimate_and_flags_what_does_not_fit(tmp_path, monkeypatch, capsys):
    """ganguli2023 on 8 x 80 GB, its model's config.json in the Hugging Face cache: the lines the README shows."""
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-1.7B" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(SMOLLM2_1_7B))
    (tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-1.7B" / "refs").mkdir()
    (tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-1.7B" / "refs" / "main").write_text("abc")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "ganguli2023", "--dry-run", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("memory per process") :].split("\nnote:")[0].strip()
    assert block.startswith("memory per process (estimate; 8 process(es), DeepSpeed ZeRO-2, bfloat16):")
    assert re.search(r"ppo +\d+\.\d GB \(weights 13\.7, gradients 0\.9, optimizer 5\.1, ema 6\.8,", block), block
    readme = (ROOT / "README.md").read_text()
    assert block in readme, "README's ganguli2023 memory block differs from what the dry run prints"


def test_lora_shrinks_the_trained_state():
    arch = Architecture.from_config(SMOLLM2_1_7B)
    assert arch.lora_params(16) < arch.n_params / 50
    assert arch.lora_params(16, "q_proj") < arch.lora_params(16, LoraSection().target_modules)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_supervised_estimates_count_checkpointing_as_trl_runs_it(stage):
    """TRL's SFTConfig and RewardConfig switch activation checkpointing on unless told otherwise, under either of
    transformers' names for it; the estimate follows the same rule."""
    from selfcorrect.memory import _activations, estimate_supervised

    arch = Architecture.from_config(SMOLLM2_1_7B)
    launch = Launch(1, None)

    def activations(trainer: dict) -> float:
        return estimate_supervised(stage, trainer, arch, None, launch, "bfloat16", 512).parts["activations"]

    sequences = 4 * (2 if stage == "reward" else 1)
    on, off = (_activations(arch, sequences, 512, 2, flag) for flag in (True, False))
    assert on < off
    base = {"per_device_train_batch_size": 4}
    assert activations(base) == on  # TRL's default
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        assert activations({**base, name: True}) == on
        assert activations({**base, name: False}) == off
