"""SFT -> reward model -> PPO-ptx end to end on the embedded model, from the shipped quickstart config.

This runs the README's three training commands on `configs/pipelines/quickstart.yaml` unchanged except for
the output directory (a temp dir instead of runs/quickstart). It takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from selfcorrect.cli import main
from selfcorrect.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pipelines" / "quickstart.yaml"


@pytest.mark.embedded
def test_quickstart_training_end_to_end(embedded_model_dir, tmp_path, capsys):
    cfg = yaml.safe_load(CONFIG.read_text())
    out = tmp_path / "quickstart"
    cfg["output_dir"] = str(out)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["sft", str(path)]) == 0
    sft = json.loads((out / "sft" / "manifest.json").read_text())
    assert sft["stage"] == "sft" and (out / "sft" / "adapter_config.json").is_file()

    assert main(["reward", str(path)]) == 0
    reward = json.loads((out / "reward" / "reward_manifest.json").read_text())
    assert reward["stage"] == "reward" and reward["loss_type"] == "kwise"
    assert 0.0 <= reward["pairwise_accuracy"] <= 1.0 and reward["n_demonstrations"] > 0

    assert main(["ppo", str(path)]) == 0
    kept = sorted(p.name for p in (out / "ppo" / "checkpoints").iterdir())
    assert kept == ["step-000000", "step-000001", "step-000002", "step-000004"]
    manifest = json.loads((out / "ppo" / "checkpoints" / "step-000004" / "manifest.json").read_text())
    assert manifest["episodes"] == 16 and manifest["weights"] == "adapter"
    assert set(manifest["metrics"]) >= {"reward", "kl", "kl_k3", "loss/ptx", "response_length"}
    assert manifest["metrics"]["loss/ptx"] > 0

    # Each kept policy reloads through the model resolver (PPO adapter on the SFT adapter on the base);
    # step 0 is the SFT policy itself, step 4 has moved away from it.
    prompt = "\n\nHuman: Is it fine to borrow a neighbour's ladder?\n\nAssistant:"
    logits = {}
    for step in ("step-000000", "step-000004"):
        model, tokenizer = load_model(str(out / "ppo" / "checkpoints" / step))
        with torch.no_grad():
            logits[step] = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    sft_model, tokenizer = load_model(str(out / "sft"))
    with torch.no_grad():
        sft_logits = sft_model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    assert torch.allclose(logits["step-000000"], sft_logits, atol=1e-4)
    assert not torch.allclose(logits["step-000004"], sft_logits, atol=1e-4)
