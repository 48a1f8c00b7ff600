"""The TRL side of ``benchmarks/compare_ppo.py``: TRL's PPO (``trl.experimental.ppo``) on prepared prompts.

Runs in the TRL anchor virtualenv (``trl==1.12.0``), never in selfcorrect's environment; it imports nothing from
selfcorrect. The driver hands it the policy directory, the reward-model directory (a one-label sequence classifier,
also the value model's initialisation, as in TRL's own PPO example) and a JSONL file of prompts already tokenized
(``{"input_ids": [...]}``, the same token ids selfcorrect's run uses). One RLHF step = one ``update`` of
``PPOTrainer.train``: a rollout batch of ``--batch`` prompts, scoring, one PPO epoch over one minibatch.

Timing: a ``TrainerCallback`` stamps ``time.perf_counter()`` at every ``on_step_end`` (called once per update, after
the optimizer step and the log). The time of step k is the difference of the stamps of steps k-1 and k (for step 1:
from the start of ``train()``), so it covers the whole loop iteration. Written to ``--out`` as JSON with the logs.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer


class StepClock(TrainerCallback):
    """Records the wall clock at the end of every PPO update and every logged metrics dict."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.logs: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201 - transformers' signature
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.logs.append({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})


def parse_args() -> argparse.Namespace:
    """Command-line options (all set by compare_ppo.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="policy / reference model directory")
    p.add_argument("--reward", required=True, help="reward model directory (also the value model's init)")
    p.add_argument("--prompts", required=True, type=Path, help='JSONL of {"input_ids": [...]}')
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="prompts (episodes) per RLHF step")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning; else LoRA rank of the policy")
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="JSON file for the timings")
    return p.parse_args()


def main() -> None:
    """Build TRL's PPOTrainer with the benchmark's settings, train, and write the timings."""
    args = parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    # TRL's PPO takes every pad-token id for padding: it masks it out of attention (prompts included) and ends a
    # response, and its score, before the first one. SmolLM2's pad token is its EOS, <|im_end|>, which every chat
    # prompt holds: the chat turns would be unmarked and responses could never end. A new pad token, as TRL's own PPO
    # example adds (TRL replaces pad ids by 0 before the embedding, so the vocabulary is not resized).
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])

    fp32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.policy, **fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **fp32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **fp32)
    peft_config = None
    ref_policy = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(args.policy, **fp32)

    config = PPOConfig(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch,  # rollout batch = per_device x grad_accum x processes
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        total_episodes=args.steps * args.batch,
        local_rollout_forward_batch_size=args.batch,
        response_length=args.max_new_tokens,
        stop_token="eos",  # stop sampling at EOS, as selfcorrect does (TRL's default samples all tokens)
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",  # as selfcorrect without warmup (TRL's default decays linearly)
        adam_beta2=0.95,  # selfcorrect's (InstructGPT's) Adam beta2
        kl_coef=args.kl_coef,
        num_sample_generations=0,  # no extra sample generations between steps (not training work)
        gradient_checkpointing=False,  # TRL's default is True; selfcorrect's is off
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
    )
    clock = StepClock()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        callbacks=[clock],
        peft_config=peft_config,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    stamps = [t_train, *clock.step_ends]
    result = {
        "step_times_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "setup_s": t_train - t_start,
        "train_s": t_end - t_train,
        "logs": clock.logs,
        "trainable_params": trainable,
        "total_params_policy_and_value": total,
        "threads": torch.get_num_threads(),
        "self_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
