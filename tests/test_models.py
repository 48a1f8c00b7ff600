"""Tests for selfcorrect.models: resolving model references and loading models, adapters and tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from selfcorrect import hub, models
from selfcorrect.errors import UserError
from selfcorrect.models import (
    EMBEDDED_DEFAULT,
    cache_dir,
    load_model,
    load_tokenizer,
    prepare_embedded,
    resolve_model_path,
)


def model_info(model: torch.nn.Module) -> dict:
    """A summary of a loaded model: parameters, dtype, device and name."""
    first = next(model.parameters())
    return {
        "n_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "name_or_path": str(model.name_or_path),
    }


PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is"


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def lora_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model whose lora_B weights are random, so it changes the outputs."""
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    out = tmp_path_factory.mktemp("tiny-lora")
    peft_model.save_pretrained(out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    config_path.write_text(json.dumps(config))
    return out


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFCORRECT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SELFCORRECT_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "selfcorrect"


def test_resolve_model_path(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    # A Hub id passes through when HF_HUB_OFFLINE=1 (the Hub libraries then read their cache) ...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("someone/not-a-model") == "someone/not-a-model"
    assert resolve_model_path("gpt2") == "gpt2"
    # ... and is refused at once, in one line, when the Hub's endpoint cannot be reached.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    hub.unreachable.cache_clear()
    try:
        with pytest.raises(UserError, match=r"gpt2: no such local model directory, and the Hugging Face Hub is unre"):
            resolve_model_path("gpt2")
    finally:
        hub.unreachable.cache_clear()
    for missing in ["./nope", "/no/such/model/dir", "~/no-such-selfcorrect-model", "a/b/c"]:
        with pytest.raises(UserError, match="model path not found"):
            resolve_model_path(missing)


def test_resolve_rejects_a_file(tiny_model_dir: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        resolve_model_path(str(tiny_model_dir / "config.json"))


def test_unknown_embedded_name_lists_known_names() -> None:
    with pytest.raises(UserError, match="smollm2-135m-instruct") as error:
        resolve_model_path("embedded:gpt-17")
    assert "gpt-17" in str(error.value)


def test_embedded_model_whose_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.EMBEDDED_MODELS, "ghost", ("selfcorrect_no_such_package", "ghost.gguf"))
    with pytest.raises(UserError, match="selfcorrect_no_such_package"):
        prepare_embedded("ghost")


def test_local_dir_loads_in_float32_on_cpu(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"
    info = model_info(model)
    assert info == {
        "n_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "dtype": "float32",
        "device": "cpu",
        "name_or_path": str(tiny_model_dir),
    }
    # 49152 x 64 tied embeddings plus two small layers
    assert 3_000_000 < info["n_parameters"] < 4_000_000


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16)],
)
def test_dtype_argument(tiny_model_dir: Path, dtype: str | torch.dtype, expected: torch.dtype) -> None:
    model, _ = load_model(str(tiny_model_dir), dtype=dtype, device="cpu")
    assert {parameter.dtype for parameter in model.parameters()} == {expected}
    assert model_info(model)["dtype"] == str(expected).removeprefix("torch.")


def test_bad_dtype_is_a_user_error(tiny_model_dir: Path) -> None:
    with pytest.raises(UserError, match="float8"):
        load_model(str(tiny_model_dir), dtype="float8", device="cpu")


def test_dir_without_safetensors_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A directory with only pickle weights (pytorch_model.bin) must not be loaded."""
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model_dir)
    state_dict = LlamaForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    torch.save(state_dict, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors") as error:
        load_model(str(model_dir), device="cpu")
    assert str(model_dir) in str(error.value)


def test_nonexistent_path_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model path not found: ./nope"):
        load_model("./nope", device="cpu")


def test_lora_adapter_merged_equals_unmerged(tiny_model_dir: Path, lora_adapter_dir: Path) -> None:
    base, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    merged, merged_tokenizer = load_model(str(lora_adapter_dir), device="cpu")
    unmerged, _ = load_model(str(lora_adapter_dir), device="cpu", merge_lora=False)
    assert isinstance(merged, LlamaForCausalLM)
    assert isinstance(unmerged, PeftModel)
    assert not merged.training and not unmerged.training
    # the adapter dir has no tokenizer files: the base's tokenizer is used
    assert merged_tokenizer.get_vocab() == tokenizer.get_vocab()

    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    base_logits = _logits(base, input_ids)
    merged_logits = _logits(merged, input_ids)
    unmerged_logits = _logits(unmerged, input_ids)
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-5, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-3


def test_load_tokenizer(tiny_model_dir: Path, lora_adapter_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(PROMPT, add_special_tokens=False)) == PROMPT
    # an adapter without tokenizer files gives its base's tokenizer ...
    assert load_tokenizer(str(lora_adapter_dir)).get_vocab() == tokenizer.get_vocab()
    # ... and one with tokenizer files gives its own
    adapter_dir = tmp_path / "adapter-with-tokenizer"
    shutil.copytree(lora_adapter_dir, adapter_dir)
    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    own.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
    own.save_pretrained(adapter_dir)
    assert len(load_tokenizer(str(adapter_dir))) == len(tokenizer) + 1
    _, loaded = load_model(str(adapter_dir), device="cpu")
    assert len(loaded) == len(tokenizer) + 1


def test_dir_without_tokenizer_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "no-tokenizer"
    model_dir.mkdir()
    for name in ["config.json", "model.safetensors"]:
        shutil.copy(tiny_model_dir / name, model_dir / name)
    with pytest.raises(UserError, match="no tokenizer files") as error:
        load_model(str(model_dir), device="cpu")
    assert str(model_dir) in str(error.value)


def test_lora_adapter_with_missing_base(lora_adapter_dir: Path, tmp_path: Path) -> None:
    adapter_dir = tmp_path / "orphan-adapter"
    shutil.copytree(lora_adapter_dir, adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="base_model_name_or_path") as error:
        load_model(str(adapter_dir), device="cpu")
    assert str(config_path) in str(error.value)
    assert "deleted-base" in str(error.value)


def test_hub_id_offline_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; patch the constant it consults too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="someone/not-a-model: .* cannot be loaded from the Hugging Face Hub"):
        load_model("someone/not-a-model", device="cpu")


def test_hub_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in [load_model, load_tokenizer]:
        with pytest.raises(UserError, match="Hugging Face Hub") as error:
            load("someone/not-a-model")
        assert "\n" not in str(error.value)


@pytest.mark.embedded
def test_embedded_model_converts_once_and_answers(embedded_model_dir: Path) -> None:
    assert embedded_model_dir == cache_dir() / "models" / "smollm2-135m-instruct"
    weights = embedded_model_dir / "model.safetensors"
    assert weights.is_file()
    assert (embedded_model_dir / ".complete").is_file()
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"

    # a second call finds the finished directory and does not convert again
    mtime = weights.stat().st_mtime_ns
    assert prepare_embedded() == embedded_model_dir
    assert weights.stat().st_mtime_ns == mtime
    assert resolve_model_path(EMBEDDED_DEFAULT) == str(embedded_model_dir)

    model, tokenizer = load_model(EMBEDDED_DEFAULT, device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert weights.stat().st_mtime_ns == mtime
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template
    assert len(tokenizer.encode(" (", add_special_tokens=False)) == 1
    assert len(tokenizer.encode("a", add_special_tokens=False)) == 1

    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    next_token = _logits(model, input_ids)[0, -1].argmax().item()
    assert "Paris" in tokenizer.decode([next_token])
