"""Fixtures of ``benchmarks/compare_ppo.py``, made once with selfcorrect's environment and shared by both tools.

* the policy: the embedded SmolLM2-135M-Instruct converted to a safetensors directory (``prepare_embedded``), unless
  ``--model`` names a directory;
* the reward model ``<fixtures>/reward-<model dir name>-seed<S>``: that model as a one-label
  ``AutoModelForSequenceClassification`` whose new ``score`` head is drawn from N(0, initializer_range) with a
  generator seeded by ``--seed``, saved as safetensors with its tokenizer and a ``reward_manifest.json`` (bias 0,
  dialogue ``human_assistant``) so that selfcorrect's ``RewardModel.load`` takes it; TRL loads the same directory
  as reward model and as the value model's initialisation;
* the prompts: the first ``--count`` HH prompts (the turns before the chosen transcript's last reply) whose
  ``human_assistant`` rendering (``"\\n\\nHuman: ...\\n\\nAssistant:"``) is at most ``--max-prompt-length`` tokens,
  written as ``prompts_selfcorrect.jsonl`` (``{"prompt": messages}``, selfcorrect's ``format: prompt``) and
  ``prompts_trl.jsonl`` (``{"input_ids": [...]}``, the very token ids selfcorrect's run computes from them).

Writes ``<work>/fixtures.json``: ``{"model": dir, "reward_model": dir, "prompts_selfcorrect": file, "prompts_trl":
file, "prompt_tokens": [...]}``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selfcorrect import dialogue as dialogues
from selfcorrect.data import split_hh_transcript
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.models import prepare_embedded
from selfcorrect.rundir import REWARD_MANIFEST


def make_reward_model(model_dir: Path, out: Path, seed: int) -> Path:
    """A one-label sequence classifier from ``model_dir`` with a seeded random head, saved to ``out`` (once)."""
    if (out / REWARD_MANIFEST).is_file():
        return out
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    std = model.config.get_text_config().initializer_range
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * std)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    manifest = {
        "stage": "reward",
        "bias": 0.0,
        "dialogue": DialogueSpec().record(),
        "note": f"benchmark fixture: {model_dir} with a random one-label head (seed {seed}); not trained",
    }
    (tmp / REWARD_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(out)
    return out


def write_prompts(
    hh_file: Path, tokenizer_dir: Path, out_dir: Path, count: int, max_len: int, spec: DialogueSpec | None = None
) -> dict[str, object]:
    """The two prompt files (see the module docstring) in dialogue ``spec`` (default ``human_assistant``); returns
    their paths and the prompts' token counts."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = spec or DialogueSpec()
    messages_list, ids_list = [], []
    with gzip.open(hh_file, "rt", encoding="utf-8") as fh:
        for line in fh:
            try:
                messages, _ = split_hh_transcript(json.loads(line)["chosen"])
            except ValueError:
                continue
            ids = dialogues.encode(tokenizer, dialogues.prompt_text(messages, spec, tokenizer), spec)
            if len(ids) <= max_len:
                messages_list.append(messages)
                ids_list.append(ids)
            if len(ids_list) == count:
                break
    if len(ids_list) < count:
        raise SystemExit(f"only {len(ids_list)} HH prompts fit in {max_len} tokens; {count} needed")
    out_dir.mkdir(parents=True, exist_ok=True)
    sc_file, trl_file = out_dir / "prompts_selfcorrect.jsonl", out_dir / "prompts_trl.jsonl"
    sc_file.write_text("".join(json.dumps({"prompt": m}) + "\n" for m in messages_list))
    trl_file.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in ids_list))
    return {
        "prompts_selfcorrect": str(sc_file),
        "prompts_trl": str(trl_file),
        "prompt_tokens": [len(ids) for ids in ids_list],
    }


def main() -> None:
    """Make (or reuse) the fixtures and write where they are to ``<work>/fixtures.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="policy directory (default: the embedded model, converted once)")
    p.add_argument("--fixtures", required=True, type=Path, help="where the reward model is kept")
    p.add_argument("--hh-file", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path, help="where the prompt files go")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--max-prompt-length", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model_dir = Path(args.model) if args.model else prepare_embedded()
    reward_dir = make_reward_model(model_dir, args.fixtures / f"reward-{model_dir.name}-seed{args.seed}", args.seed)
    prompts = write_prompts(args.hh_file, model_dir, args.work, args.count, args.max_prompt_length)
    record = {"model": str(model_dir), "reward_model": str(reward_dir), **prompts}
    (args.work / "fixtures.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
