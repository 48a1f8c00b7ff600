"""``process_docs`` of the ``bbq_local`` lm-eval task (``benchmarks/compare_eval.py`` copies this file beside the
generated task YAML, where lm-eval's ``!function`` finds it).

lm-eval 0.4.13's ``tasks/bbq/utils.process_docs`` maps over every record of the split and fails on a record one of
whose answers has an empty ``answer_info`` and is not a "Latina" answer (it then reuses the previous answer's group,
already a list: ``AttributeError: 'list' object has no attribute 'replace'``). The regenerated BBQ categories of the
local data have such records (see the data README: Race_ethnicity, SES, Race_x_SES, Race_x_gender); the official hub
copy lm-eval normally loads has had them fixed. So those records are dropped first and lm-eval's own
``process_docs`` does the rest. ``Age`` (the first documents, which ``--limit`` takes) loses none.
"""

from __future__ import annotations

from typing import Any

from lm_eval.tasks.bbq.utils import process_docs as lm_eval_process_docs

ANSWERS = ("ans0", "ans1", "ans2")


def readable(doc: dict[str, Any]) -> bool:
    """Whether lm-eval's ``process_docs`` can handle the record (every answer has a group or is a Latina answer)."""
    return all(any(doc["answer_info"][a]) or "Latina" in doc[a] for a in ANSWERS)


def process_docs(dataset: Any) -> Any:
    """lm-eval's BBQ ``process_docs`` on the records it can read."""
    return lm_eval_process_docs(dataset.filter(readable))
