"""Prompt conditions (from the shipped ``configs/prompts/*.yaml`` and the user's files) turned into the dialogue text
that is scored.

Python holds no prompt wording: a condition is a list of Human-turn parts, an assistant prefix and, for
chain of thought (CoT), the assistant's opening words and the follow-up Human turn. A benchmark supplies
the fields (``{context}``, ``{sentence}``, ...) of each record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any, Literal

from pydantic import Field, create_model

from selfcorrect.config import StrictModel, configs_dir, load_config, shipped_file
from selfcorrect.dialogue import DialogueSpec, continued_text
from selfcorrect.errors import UserError
from selfcorrect.evaluate.benchmarks import BENCHMARK_NAMES

DEFAULT_PROMPT_FILES = ("ganguli2023.yaml", "liu2024.yaml")


class CotSampling(StrictModel):
    """How the CoT reasoning is sampled (PROTOCOL section 1.3 [OURS])."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = ["\n\nHuman:"]


class ConditionPrompt(StrictModel):
    """One prompt condition of one benchmark."""

    description: str = ""
    provisional: bool = False
    human: list[str]
    assistant: str
    cot: str | None = None
    followup: list[str] | None = None


class BenchmarkPrompts(StrictModel):
    """The conditions of one benchmark plus its readout (text after the prefix) and candidate strings."""

    readout: str | None = None
    candidates: list[str] | dict[str, list[str]] | None = None
    vars: dict[str, dict[str, str]] = {}
    conditions: dict[str, ConditionPrompt]


class PromptFileHeader(StrictModel):
    """What a prompts YAML file says besides its benchmarks."""

    name: str
    source: str = ""
    join: str = "\n\n"
    cot_sampling: CotSampling | None = None


# A prompts YAML file: the header, then one optional section per registered benchmark (``bbq:``, ``winogender:``...).
_SECTIONS: dict[str, Any] = {name: (BenchmarkPrompts | None, None) for name in BENCHMARK_NAMES}
PromptFile = create_model("PromptFile", __base__=PromptFileHeader, **_SECTIONS)


@dataclass(frozen=True)
class Turn:
    """One dialogue turn; a final assistant turn is a prefix the model continues."""

    role: Literal["human", "assistant"]
    text: str


@dataclass(frozen=True)
class ItemPrompt:
    """The prompt of one benchmark item under one condition."""

    item_id: str
    human: str
    assistant: str  # the scored assistant prefix, readout included
    candidates: tuple[str, ...]
    cot: str | None = None  # CoT: the assistant's opening words before the sampled reasoning
    followup: str | None = None  # CoT: the Human turn after the reasoning

    @property
    def is_cot(self) -> bool:
        return self.cot is not None

    def cot_turns(self) -> list[Turn]:
        """The first CoT stage: the dialogue whose continuation is the sampled reasoning."""
        assert self.cot is not None, "not a CoT prompt"
        return [Turn("human", self.human), Turn("assistant", self.cot)]

    def scored_turns(self, reasoning: str | None = None) -> list[Turn]:
        """The dialogue whose next token is read; for CoT, with the sampled reasoning inserted."""
        if self.cot is None:
            return [Turn("human", self.human), Turn("assistant", self.assistant)]
        if reasoning is None:
            raise ValueError(f"{self.item_id}: a CoT prompt needs its reasoning")
        said = f"{self.cot} {reasoning.strip()}".rstrip()
        return [
            Turn("human", self.human),
            Turn("assistant", said),
            Turn("human", self.followup or ""),
            Turn("assistant", self.assistant),
        ]


@dataclass
class PromptSet:
    """All prompt conditions of the loaded prompt files, by benchmark."""

    benchmarks: dict[str, BenchmarkPrompts]
    files: dict[tuple[str, str], Path]  # (benchmark, condition) -> file that defines it
    join: str
    cot_sampling: CotSampling

    def conditions(self, benchmark: str) -> list[str]:
        """Condition names defined for a benchmark, in file order."""
        bench = self.benchmarks.get(benchmark)
        return list(bench.conditions) if bench else []

    def condition(self, benchmark: str, condition: str) -> ConditionPrompt:
        known = self.conditions(benchmark)
        if condition not in known:
            raise UserError(f"unknown condition '{condition}' for benchmark {benchmark} (known: {', '.join(known)})")
        return self.benchmarks[benchmark].conditions[condition]

    def readout(self, benchmark: str) -> str:
        return self.benchmarks[benchmark].readout or ""

    def candidates(self, benchmark: str) -> list[str] | dict[str, list[str]]:
        cands = self.benchmarks[benchmark].candidates
        if not cands:
            raise UserError(f"no prompt file defines the candidates of benchmark {benchmark}")
        return cands

    def vars(self, benchmark: str) -> dict[str, dict[str, str]]:
        bench = self.benchmarks.get(benchmark)
        return bench.vars if bench else {}

    def build(
        self, benchmark: str, condition: str, item_id: str, fields: dict[str, object], candidates: list[str]
    ) -> ItemPrompt:
        """Fill a condition's templates with one record's fields."""
        cond = self.condition(benchmark, condition)

        def fill(template: str) -> str:
            try:
                return template.format(**fields)
            except KeyError as exc:
                raise UserError(
                    f"{self.files[(benchmark, condition)]}: {benchmark}.conditions.{condition}: "
                    f"unknown field {{{exc.args[0]}}} (available: {', '.join(sorted(fields))})"
                ) from None

        return ItemPrompt(
            item_id=item_id,
            human=self.join.join(fill(p) for p in cond.human),
            assistant=fill(cond.assistant) + fill(self.readout(benchmark)),
            candidates=tuple(candidates),
            cot=fill(cond.cot) if cond.cot is not None else None,
            followup=self.join.join(fill(p) for p in cond.followup) if cond.followup else None,
        )


def template_error(template: str) -> str | None:
    """What is wrong with a prompt template, or None: only named fields ``{name}`` and ``{{``/``}}`` are allowed.

    Positional fields (``{}``, ``{0}``), attribute or index access (``{a.b}``, ``{a[0]}``), conversions
    (``{a!r}``), format specs (``{a:>5}``) and unbalanced braces would crash at rendering or put a Python
    object's description into the prompt.
    """
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:
        return f"unbalanced brace ({exc}); write {{{{ or }}}} for a literal brace"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            return f"positional field {field} (use a named field such as {{context}})"
        if "." in name or "[" in name:
            return f"attribute or index access {field} (only plain named fields such as {{context}} are allowed)"
        if not name.isidentifier():
            return f"{field} is not a field name (write {{{{ or }}}} for a literal brace)"
        if conversion or spec:
            return f"conversion or format spec in {field} (only plain named fields such as {{{name}}} are allowed)"
    return None


def _check_templates(path: Path, benchmark: str, bench: BenchmarkPrompts) -> None:
    """Every template of a benchmark's prompts (readout, and each condition's texts) is well formed."""
    templates = [(f"{benchmark}.readout", bench.readout)]
    for name, cond in bench.conditions.items():
        key = f"{benchmark}.conditions.{name}"
        templates += [(f"{key}.human[{i}]", t) for i, t in enumerate(cond.human)]
        templates += [(f"{key}.assistant", cond.assistant), (f"{key}.cot", cond.cot)]
        templates += [(f"{key}.followup[{i}]", t) for i, t in enumerate(cond.followup or [])]
    for where, template in templates:
        problem = template_error(template) if template is not None else None
        if problem:
            raise UserError(f"{path}: {where}: {problem}")


def load_prompts(extra_files: Sequence[str | Path] | None = None) -> PromptSet:
    """Load the shipped prompt files plus any extra ones; a condition defined twice is an error.

    Readout and candidates come from the first file that defines them; ``cot_sampling`` from the last.
    """
    paths = [configs_dir() / "prompts" / name for name in DEFAULT_PROMPT_FILES]
    paths += [shipped_file(p, "prompts") or Path(p) for p in extra_files or []]
    benchmarks: dict[str, BenchmarkPrompts] = {}
    files: dict[tuple[str, str], Path] = {}
    join, cot_sampling = None, None
    for path in paths:
        pf = load_config(path, PromptFile)
        join = join if join is not None else pf.join
        cot_sampling = pf.cot_sampling or cot_sampling  # a later file may retune the CoT sampling
        for name in BENCHMARK_NAMES:
            bench: BenchmarkPrompts | None = getattr(pf, name)
            if bench is None:
                continue
            _check_templates(path, name, bench)
            merged = benchmarks.setdefault(name, BenchmarkPrompts(conditions={}))
            merged.readout = merged.readout if merged.readout is not None else bench.readout
            merged.candidates = merged.candidates or bench.candidates
            merged.vars = {**merged.vars, **bench.vars}
            for cond_name, cond in bench.conditions.items():
                if (name, cond_name) in files:
                    raise UserError(
                        f"{path}: {name}.conditions.{cond_name}: already defined in {files[(name, cond_name)]}"
                    )
                if (cond.cot is None) != (cond.followup is None):
                    raise UserError(f"{path}: {name}.conditions.{cond_name}: 'cot' and 'followup' go together")
                merged.conditions[cond_name] = cond
                files[(name, cond_name)] = path
    return PromptSet(benchmarks, files, join if join is not None else "\n\n", cot_sampling or CotSampling())


def render(turns: list[Turn], dialogue: DialogueSpec | None = None, tokenizer=None) -> str:
    """The text of a dialogue whose last turn is an assistant prefix to be continued, in a dialogue format.

    ``human_assistant`` (the default): the papers' ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` text.
    ``chat_template``: the tokenizer's own chat template, with the assistant turn opened and continued.
    """
    messages = [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns[:-1]]
    return continued_text(messages, turns[-1].text, dialogue or DialogueSpec(), tokenizer)
