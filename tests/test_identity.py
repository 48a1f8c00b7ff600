"""Results stay true to their inputs: local data count by content, adapters never load on a replaced base, a run
directory can move. A tiny LoRA run (SFT -> PPO with a rule reward -> evaluate), real files, no mocks."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from selfcorrect.cli import main
from selfcorrect.errors import UserError
from selfcorrect.models import fingerprint, load_model
from selfcorrect.provenance import content_fingerprint
from selfcorrect.train.checkpoints import dependent_checkpoints, save_checkpoint

HH = Path("hh-rlhf") / "harmless-base-test.jsonl.gz"
IDS = torch.tensor([[1, 5, 9, 200, 17, 3000, 42]])
KEPT = ("step-000000", "step-000001")


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy_data(to: Path) -> Path:
    """The run's data dir: the HH slice it trains on and the Winogender files it is evaluated on."""
    source = Path(os.environ["SELFCORRECT_DATA_DIR"])
    (to / HH).parent.mkdir(parents=True)
    shutil.copy2(source / HH, to / HH)
    shutil.copytree(source / "winogender", to / "winogender")
    return to


def lora_config(model: Path, out: Path, rules: str) -> dict:
    """SFT (LoRA) -> PPO (LoRA, a rule reward) with checkpoints at steps 0 and 1 -> evaluate: data by
    $SELFCORRECT_DATA_DIR, so pointing it at a copy is the same config file."""
    hh = f"$SELFCORRECT_DATA_DIR/{HH}"
    return {
        "name": "lora",
        "output_dir": str(out),
        "seed": 0,
        "model": {"name_or_path": str(model)},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "sft": {
            "data": {"path": hh, "format": "hh", "limit": 8},
            "max_length": 128,
            "trainer": {"max_steps": 1, "per_device_train_batch_size": 4},
        },
        "ppo": {
            "prompts": {"path": hh, "format": "hh", "limit": 8},
            "reward_model": f"{rules}:length",
            "steps": 1,
            "save_at_steps": [0, 1],
            "rollout_batch_size": 2,
            "mini_batch_size": 2,
            "max_new_tokens": 4,
            "max_prompt_length": 64,
        },
        "evaluation": {"benchmarks": ["winogender"], "conditions": ["q"], "limit": 3, "bootstrap": 0},
    }


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> dict:
    """A finished tiny LoRA pipeline run on a copy of the data dir (``data``), and its config."""
    tmp = tmp_path_factory.mktemp("identity")
    data = copy_data(tmp / "data")
    rules = "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
    (tmp / "identity_rules.py").write_text(rules)
    path = write(tmp / "lora.yaml", lora_config(tiny_model_dir, tmp / "run", "identity_rules"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # the PPO child's reward
        mp.syspath_prepend(str(tmp))
        mp.setenv("SELFCORRECT_DATA_DIR", str(data))
        assert main(["pipeline", str(path)]) == 0
    return {"tmp": tmp, "out": tmp / "run", "path": path, "data": data}


@pytest.fixture
def in_run_env(lora_run, monkeypatch) -> dict:
    """The environment the run was made in (its data dir; its rule reward importable, here and in children)."""
    tmp = lora_run["tmp"]
    monkeypatch.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp))
    monkeypatch.setenv("SELFCORRECT_DATA_DIR", str(lora_run["data"]))
    return lora_run


def files_of(root: Path) -> dict[Path, int]:
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def one_line(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def logits(ref: Path) -> torch.Tensor:
    model, _ = load_model(str(ref), device="cpu", dtype="float32")
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---- data by content ---------------------------------------------------------------------------------------------


def test_content_fingerprint_is_the_bytes_and_is_cached_per_path_size_and_mtime(tmp_path, selfcorrect_cache_dir):
    a, b = tmp_path / "a.jsonl", tmp_path / "elsewhere" / "b.jsonl"
    a.write_text('{"text": "one"}\n')
    b.parent.mkdir()
    shutil.copy(a, b)
    digest = hashlib.sha256(a.read_bytes()).hexdigest()
    assert content_fingerprint(a) == content_fingerprint(b) == {"size": a.stat().st_size, "sha256": digest}
    cache = json.loads((selfcorrect_cache_dir / "file-hashes.json").read_text())
    entry = cache[str(a.resolve())]
    assert entry["size"] == a.stat().st_size and entry["mtime_ns"] == a.stat().st_mtime_ns
    # the cache is what answers while the path, size and mtime are those recorded (so big files are hashed once)...
    cache[str(a.resolve())]["sha256"] = "cached"
    (selfcorrect_cache_dir / "file-hashes.json").write_text(json.dumps(cache))
    assert content_fingerprint(a)["sha256"] == "cached"
    # ...and a file written again is hashed again
    a.write_text('{"text": "three"}\n')
    assert content_fingerprint(a)["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest() != "cached"
    # a directory: its files' names and contents
    assert content_fingerprint(b.parent) != content_fingerprint(a.parent)
    shutil.copytree(b.parent, tmp_path / "copy")
    assert content_fingerprint(tmp_path / "copy") == content_fingerprint(b.parent)


def test_a_finished_run_rerun_on_a_copy_of_its_data_dir_does_nothing(in_run_env, tmp_path, monkeypatch, capsys):
    out, path, data = in_run_env["out"], in_run_env["path"], in_run_env["data"]
    copy = copy_data(tmp_path / "mounted-elsewhere")
    before = files_of(out)
    data.rename(data.with_name("data-away"))  # the recorded location is gone: only the content can match
    try:
        monkeypatch.setenv("SELFCORRECT_DATA_DIR", str(copy))
        capsys.readouterr()
        assert main(["pipeline", str(path)]) == 0
        assert "nothing to do" in capsys.readouterr().out
        assert files_of(out) == before
    finally:
        data.with_name("data-away").rename(data)


def test_a_changed_data_file_is_a_changed_run_and_the_message_names_it(in_run_env, tmp_path, monkeypatch, capsys):
    out, path = in_run_env["out"], in_run_env["path"]
    copy = copy_data(tmp_path / "edited")
    with gzip.open(copy / HH, "rt") as f:
        lines = f.read().splitlines()
    with gzip.open(copy / HH, "wt") as f:  # one conversation fewer
        f.write("\n".join(lines[1:]) + "\n")
    monkeypatch.setenv("SELFCORRECT_DATA_DIR", str(copy))
    state = (out / "pipeline.json").read_text()
    capsys.readouterr()
    assert main(["pipeline", str(path)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"stage 'sft' finished with another config (changed: the content of sft.data.path {copy / HH}" in err
    assert "--force" in err and (out / "pipeline.json").read_text() == state
    assert main(["pipeline", str(path), "--force", "--dry-run"]) == 0
    assert f"sft       rerun  config changed: the content of sft.data.path {copy / HH}" in capsys.readouterr().out


def test_runs_recorded_by_path_before_are_recorded_by_content_once(in_run_env, tmp_path, capsys):
    """A pipeline.json written before contents were recorded holds each data file's path: while the file is there,
    the record takes its content (once, rewritten) and the run stays done; where it has gone, the message says so."""
    from selfcorrect.config.run import load_run_config
    from selfcorrect.pipeline.plan import resolved_configs

    out, path = in_run_env["out"], in_run_env["path"]
    state_path = out / "pipeline.json"
    current = state_path.read_text()
    state = json.loads(current)
    by_path = resolved_configs(load_run_config(path), by_content=False)  # the records as they were made before
    for stage, record in state["stages"].items():
        record["resolved"] = by_path[stage]
    old = json.dumps(state, indent=2, sort_keys=True) + "\n"
    assert old != current and str(in_run_env["data"] / HH) in old
    try:
        state_path.write_text(old)
        capsys.readouterr()
        assert main(["pipeline", str(path)]) == 0
        printed = capsys.readouterr().out
        assert "nothing to do" in printed and "recorded by content (was by path)" in printed
        assert state_path.read_text() == current  # the same records as a run made now
        # a record whose recorded path is gone cannot be compared: the stage counts as changed, and says why
        state["stages"]["sft"]["resolved"]["sft"]["data"]["path"] = str(tmp_path / "gone" / HH)
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        assert main(["pipeline", str(path), "--dry-run"]) == 2
        err = one_line(capsys.readouterr().err)
        assert f"sft.data.path (recorded by path: {tmp_path / 'gone' / HH}, not there now; now" in err
    finally:
        state_path.write_text(current)


# ---- adapter bases -------------------------------------------------------------------------------------------


def test_kept_checkpoints_record_their_base_by_relative_path_and_fingerprint(lora_run):
    out = lora_run["out"]
    sft = json.loads((out / "sft" / "manifest.json").read_text())
    assert sft["base_model_fingerprint"] == fingerprint(sft["base_model"])
    for name in KEPT:
        manifest = json.loads((out / "ppo" / "checkpoints" / name / "manifest.json").read_text())
        assert manifest["weights"] == "adapter" and manifest["base_model"] == str((out / "sft").resolve())
        assert manifest["base_model_relative"] == os.path.join("..", "..", "..", "sft")
        assert manifest["base_model_fingerprint"] == fingerprint(str(out / "sft"))
    assert dependent_checkpoints(out / "ppo", out / "sft") == [out / "ppo" / "checkpoints" / n for n in KEPT]


def test_sft_over_kept_adapter_checkpoints_is_refused_and_nothing_is_overwritten(in_run_env, capsys):
    out, path = in_run_env["out"], in_run_env["path"]
    before, state = files_of(out), (out / "pipeline.json").read_text()
    capsys.readouterr()
    assert main(["sft", str(path)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{out / 'ppo' / 'checkpoints'}/{{{','.join(KEPT)}}} are LoRA adapters on it" in err
    assert "--from sft" in err and "--force" in err
    assert main(["pipeline", str(path), "--only", "sft"]) == 2  # the pipeline rerunning SFT alone: the same
    err = one_line(capsys.readouterr().err)
    assert "rerunning stage 'sft' replaces" in err and "--from sft" in err and "--force" in err
    assert files_of(out) == before and (out / "pipeline.json").read_text() == state


def test_a_moved_run_loads_and_evaluates_its_kept_checkpoints(in_run_env, tmp_path, capsys):
    out, path = in_run_env["out"], in_run_env["path"]
    expected = {name: logits(out / "ppo" / "checkpoints" / name) for name in KEPT}
    moved = tmp_path / "moved" / "lora"
    moved.parent.mkdir()
    shutil.move(out, moved)
    try:
        for name in KEPT:  # the recorded absolute base (the old sft/) is gone: the relative one is found
            assert not (out / "sft").exists()
            assert torch.equal(logits(moved / "ppo" / "checkpoints" / name), expected[name])
        results = {p: p.read_text() for p in (moved / "eval").glob("step-*/winogender/q.jsonl")}
        assert len(results) == 2
        capsys.readouterr()
        assert (
            main(
                [
                    "evaluate",
                    str(moved),
                    "--benchmarks",
                    "winogender",
                    "--conditions",
                    "q",
                    "--limit",
                    "3",
                    "--bootstrap",
                    "0",
                ]
            )
            == 0
        ), capsys.readouterr().err  # into its own eval/: every item was done
        assert {p: p.read_text() for p in results} == results
        cfg = yaml.safe_load(path.read_text())
        cfg["output_dir"] = str(moved)
        assert main(["pipeline", str(write(tmp_path / "moved.yaml", cfg))]) == 0
        assert "nothing to do" in capsys.readouterr().out
    finally:
        shutil.move(moved, out)


def test_sft_force_invalidates_the_kept_checkpoints_and_they_are_refused(in_run_env, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(in_run_env["out"], copy)  # a copy of the run: its checkpoints' base is its own sft/
    cfg = yaml.safe_load(in_run_env["path"].read_text())
    cfg["output_dir"] = str(copy)
    path = write(tmp_path / "copy.yaml", cfg)
    kept = copy / "ppo" / "checkpoints" / "step-000001"
    logits(kept)  # loads before
    capsys.readouterr()
    assert main(["sft", str(path), "--force"]) == 0
    err = capsys.readouterr().err
    assert f"sft: --force: retraining {copy / 'sft'} invalidates the kept checkpoints " in err
    assert "--from ppo" in err
    assert set(json.loads((copy / "pipeline.json").read_text())["stages"]) == {"sft"}  # PPO and after: not done
    with pytest.raises(UserError, match="has changed since this adapter was trained on it") as refused:
        load_model(str(kept), device="cpu")
    assert str(kept) in str(refused.value) and "--from ppo" in str(refused.value)
    assert (
        main(
            [
                "evaluate",
                str(kept),
                "--benchmarks",
                "winogender",
                "--conditions",
                "q",
                "--limit",
                "3",
                "--output",
                str(tmp_path / "ev"),
            ]
        )
        == 2
    )
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"selfcorrect: error: {kept}: refused: its base {copy / 'sft'} has changed")
    assert main(["export", str(kept), str(tmp_path / "exported")]) == 2 and not (tmp_path / "exported").exists()


def test_an_adapter_records_its_base_and_is_refused_on_another(tiny_model_dir, tmp_path):
    """save_checkpoint on a local base: moved together, the adapter loads; base replaced, it is refused."""
    base = tmp_path / "run" / "sft"
    shutil.copytree(tiny_model_dir, base)
    torch.manual_seed(0)
    lora = get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    lora.peft_config["default"].base_model_name_or_path = str(base)
    kept = save_checkpoint(
        tmp_path / "run" / "ppo",
        3,
        lora,
        AutoTokenizer.from_pretrained(base),
        {"episodes": 0, "tokens": 0, "mean_reward": None, "kl": None, "config_hash": "x"},
    )
    expected = logits(kept)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    moved = tmp_path / "moved" / "ppo" / "checkpoints" / kept.name
    assert torch.equal(logits(moved), expected)
    with torch.no_grad():  # another model saved where the base was
        other = LlamaForCausalLM.from_pretrained(tmp_path / "moved" / "sft")
        for parameter in other.parameters():
            parameter.add_(1.0)
        other.save_pretrained(tmp_path / "moved" / "sft")
    with pytest.raises(UserError, match="refused: its base"):
        load_model(str(moved), device="cpu")
