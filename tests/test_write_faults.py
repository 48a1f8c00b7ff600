"""Failing writes lose nothing (issue 22): a write the OS refuses while PPO saves a kept checkpoint or ``last/``, while
an export or an evaluation writes its results, is one line naming the path (exit 74); the previous good state stays, no
half-written directory appears under a final name, and the rerun gives what an uninterrupted run gives, bit for bit.
A torn ``last/`` is a one-line error saying how to go on; a rerun without ``last/`` over kept checkpoints must
reproduce them.

The faults are real: the kernel's file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails with
EFBIG, as a full disk fails with ENOSPC), set for a child process (``preexec_fn``) or, to hit one given save of a PPO
run, by the run's own reward function at a given RLHF step. (Stop signals: test_faults.py.)
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_ppo import write_config
from transformers import AutoTokenizer, LlamaForCausalLM

from selfcorrect.cli import main
from selfcorrect.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, UserError
from selfcorrect.io import staged_dir, write_error
from selfcorrect.train.checkpoints import load_last, save_checkpoint
from selfcorrect.train.checkpoints import save_last as save_last_state

# The vowel share (test_ppo's rule reward); at the call FSIZE_AT_CALL (the RLHF step of that number, counted from the
# process's start) it lowers the process's own file-size limit to FSIZE_LIMIT bytes: the saves of that step fail.
RULES = '''
import os
import resource

CALLS = [0]


def vowels(prompts, responses):
    """Share of vowels in the response text (a rule reward for tests)."""
    CALLS[0] += 1
    if str(CALLS[0]) == os.environ.get("FSIZE_AT_CALL"):
        limit = int(os.environ["FSIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]
'''
# The tiny Llama's weights files are 13 MB (value model) and 26 MB (policy), its tokenizer.json 3.5 MB, the rest of a
# checkpoint and of last/ a few KB: under this limit everything but the weights is written.
LIMIT = 5_000_000
WEIGHTS = "model.safetensors"


def ppo_config(tmp_path: Path, policy: Path, out: Path) -> Path:
    """3 RLHF steps, kept checkpoints at steps 0 and 3, last/ after every step."""
    path = write_config(tmp_path, policy, out, steps=3, save_at_steps=[0, 3])
    (tmp_path / "rules_mod.py").write_text(RULES)
    return path


def run(args: list[str], tmp_path: Path, limit: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m selfcorrect ARGS`` in a child process (its file-size limit ``limit`` from the start, if given)."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    return subprocess.run(
        [sys.executable, "-m", "selfcorrect", *args],
        capture_output=True,  # pipes, not files: files would be under the limit too
        env=environment,
        preexec_fn=limited if limit is not None else None,
        timeout=600,
        check=False,
    )


def failed_write_line(proc: subprocess.CompletedProcess, path: Path) -> str:
    """The one-line error of a write the file-size limit refused while ``path`` was written (exit 74)."""
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_WRITE_FAILED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"selfcorrect: error: cannot write {path}: File too large"), line
    assert "the previous saved state is kept" in line
    return line


def leftovers(directory: Path) -> list[Path]:
    """Temporary files or directories of a save (``.<name>.tmp-<pid>``, ``last.tmp-<pid>``, ``.<file>.<x>.tmp``)."""
    return [p for p in directory.rglob("*") if ".tmp" in p.name or p.name == "last.old"]


def kept(ppo: Path) -> list[str]:
    return sorted(p.name for p in (ppo / "checkpoints").iterdir())


def same_bytes(a: Path, b: Path, parts: list[str]) -> None:
    for part in parts:
        assert (a / part).read_bytes() == (b / part).read_bytes(), part


@pytest.fixture(scope="module")
def clean_run(peaked_policy_dir, tmp_path_factory) -> Path:
    """The uninterrupted run of :func:`ppo_config` (its ``ppo/`` directory is only read: copy it to change it)."""
    tmp_path = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        assert main(["ppo", str(ppo_config(tmp_path, peaked_policy_dir, tmp_path / "run"))]) == 0
    return tmp_path / "run"


SAVED = [f"checkpoints/step-000000/{WEIGHTS}", f"checkpoints/step-000003/{WEIGHTS}", f"last/policy/{WEIGHTS}",
         f"last/value/{WEIGHTS}", "last/optimizer.pt"]  # fmt: skip


def test_failed_ppo_saves_keep_the_previous_state_and_the_rerun_matches(
    peaked_policy_dir, clean_run, tmp_path, monkeypatch, capsys
):
    """(b) The save of ``last/`` after step 2 fails: ``last/`` of step 1 stays. (a) On the rerun, the save of the kept
    checkpoint of step 3 fails: no ``step-000003`` appears, ``last/`` of step 2 stays. The next rerun completes with the
    checkpoints and ``last/`` of an uninterrupted run, byte for byte. Then: a torn ``last/`` is a one-line error."""
    monkeypatch.syspath_prepend(str(tmp_path))
    clean, faulty = clean_run, tmp_path / "faulty"
    cfg = ppo_config(tmp_path, peaked_policy_dir, faulty)
    ppo = faulty / "ppo"

    # (b) last/ after step 2 (no kept checkpoint at step 2).
    proc = run(["ppo", str(cfg)], tmp_path, FSIZE_AT_CALL="2", FSIZE_LIMIT=str(LIMIT))
    failed_write_line(proc, ppo / "last")
    assert load_last(ppo)["state"]["step"] == 1 and (ppo / "last" / "policy" / WEIGHTS).stat().st_size > LIMIT
    assert kept(ppo) == ["step-000000"] and not leftovers(faulty)

    # (a) the kept checkpoint of step 3: the rerun resumes at step 1, so its second reward call is step 3's.
    proc = run(["ppo", str(cfg)], tmp_path, FSIZE_AT_CALL="2", FSIZE_LIMIT=str(LIMIT))
    failed_write_line(proc, ppo / "checkpoints" / "step-000003")
    assert kept(ppo) == ["step-000000"] and not leftovers(faulty)
    assert load_last(ppo)["state"]["step"] == 2

    assert main(["ppo", str(cfg)]) == 0  # no limit: resumes at step 2
    assert kept(ppo) == kept(clean / "ppo") == ["step-000000", "step-000003"] and not leftovers(faulty)
    same_bytes(ppo, clean / "ppo", SAVED)

    # (e) A torn last/: one line naming the file, the newest kept checkpoint and the ways on; nothing restarts.
    state = ppo / "last" / "state.json"
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main(["ppo", str(cfg)]) == EXIT_BAD_INPUT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"selfcorrect: error: {state}: not valid JSON"), line
    for needle in (f"{ppo / 'checkpoints' / 'step-000003'} (step 3)", "policy weights only", f"move {ppo} aside"):
        assert needle in line, line
    assert state.read_bytes() == whole[: len(whole) // 2] and kept(ppo) == ["step-000000", "step-000003"]
    state.write_bytes(whole)
    weights = ppo / "last" / "value" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"^{weights}: unreadable .*incomplete metadata.*{ppo / 'last'} is torn"):
        load_last(ppo)


def test_a_rerun_without_last_must_reproduce_the_kept_checkpoints(
    peaked_policy_dir, clean_run, tmp_path, monkeypatch, capsys
):
    """Kept checkpoints beyond step 0 and no ``last/`` (removed, or a failed first save): the rerun trains from step 0
    and checks each kept checkpoint it reaches. Other weights there are a one-line error (and stay one on a rerun from
    the ``last/`` it wrote meanwhile); the same weights complete the run as if it had never stopped."""
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    cfg = ppo_config(tmp_path, peaked_policy_dir, out)
    ppo = out / "ppo"
    shutil.copytree(clean_run / "ppo", ppo, ignore=shutil.ignore_patterns("last"))
    before = {part: (clean_run / "ppo" / part).read_bytes() for part in SAVED}
    step3 = ppo / "checkpoints" / "step-000003" / WEIGHTS
    shutil.copyfile(ppo / "checkpoints" / "step-000000" / WEIGHTS, step3)  # not what steps 1 to 3 give
    capsys.readouterr()
    assert main(["ppo", str(cfg)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("note: ") and "training again from step 0" in line for line in err), err
    assert err[-1].startswith(f"selfcorrect: error: {step3.parent}: a training again from step 0"), err[-1]
    assert "other weights" in err[-1] and load_last(ppo)["state"]["step"] == 2
    assert main(["ppo", str(cfg)]) == EXIT_BAD_INPUT  # from last/ of step 2: still checked
    assert "other weights" in capsys.readouterr().err

    step3.write_bytes(before[f"checkpoints/step-000003/{WEIGHTS}"])
    assert main(["ppo", str(cfg)]) == 0  # the retraining from step 0 reproduces it: as if never stopped
    assert {part: (ppo / part).read_bytes() for part in SAVED} == before
    assert "verify_kept" not in load_last(ppo)["state"]


def test_a_checkpoint_save_that_differs_from_the_kept_one_is_refused(tiny_model_dir, tmp_path):
    model, tok = LlamaForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    manifest = {"episodes": 0, "tokens": 0, "mean_reward": None, "kl": None, "config_hash": "h"}
    final = save_checkpoint(tmp_path, 2, model, tok, manifest)
    assert save_checkpoint(tmp_path, 2, model, tok, manifest, verify=True) == final
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    with pytest.raises(UserError, match="other weights than this kept checkpoint holds"):
        save_checkpoint(tmp_path, 2, model, tok, manifest, verify=True)
    assert save_checkpoint(tmp_path, 2, model, tok, manifest) == final  # unchecked: kept as it is
    assert not leftovers(tmp_path)


def test_a_torn_last_names_an_intact_last_old_as_a_way_on(tmp_path):
    module = torch.nn.Linear(4, 2)
    save_last_state(tmp_path, {"step": 1}, module, None, None, rng=False)
    shutil.copytree(tmp_path / "last", tmp_path / "last.old")  # as if a save stopped before it removed it
    (tmp_path / "last" / "state.json").write_text('{"format": 1}')
    with pytest.raises(UserError) as raised:
        load_last(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'last' / 'state.json'}: not a resume state") and "\n" not in message
    assert f"replace it by {tmp_path / 'last.old'} (an intact earlier save, of step 1:" in message
    assert "kept checkpoint" not in message  # there is none


def test_a_failed_export_leaves_no_directory(peaked_policy_dir, tmp_path):
    out = tmp_path / "exports" / "step-000000"
    proc = run(["export", str(peaked_policy_dir), str(out)], tmp_path, limit=LIMIT)
    failed_write_line(proc, out)
    assert not out.exists() and not leftovers(tmp_path)
    assert main(["export", str(peaked_policy_dir), str(out)]) == 0
    assert (out / WEIGHTS).read_bytes() == (peaked_policy_dir / WEIGHTS).read_bytes()


def test_a_failed_evaluation_write_keeps_every_whole_line(tiny_model_dir, tmp_path):
    """The per-item results file reaches the file-size limit mid-evaluation: the items before stay, as whole lines,
    no metrics table is written, and the rerun scores the rest to the table of an uninterrupted run."""
    args = ["--benchmarks", "winogender", "--conditions", "q", "--limit", "8", "--batch-size", "1", "--bootstrap", "20"]
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    assert main(["evaluate", str(tiny_model_dir), "--output", str(clean), *args]) == 0
    results = clean / "winogender" / "q.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    limit = len(b"".join(lines[:-2])) + 10  # the last two items' lines cannot be written
    assert limit > max((clean / name).stat().st_size for name in ("evaluation.json", "metrics.csv"))

    proc = run(["evaluate", str(tiny_model_dir), "--output", str(faulty), *args], tmp_path, limit=limit)
    failed_write_line(proc, faulty / "winogender" / "q.jsonl")
    assert (faulty / "winogender" / "q.jsonl").read_bytes() == b"".join(lines[:-2])
    assert not (faulty / "metrics.csv").exists() and not leftovers(faulty)
    assert json.loads((faulty / "evaluation.json").read_text())["complete"] == []

    assert main(["evaluate", str(tiny_model_dir), "--output", str(faulty), *args]) == 0
    assert (faulty / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
    assert (faulty / "winogender" / "q.jsonl").read_bytes() == results.read_bytes()


TORN_ZIP = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _chained(error: Exception, cause: BaseException) -> Exception:
    error.__context__ = cause
    return error


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        # What the libraries raised on this machine under ``ulimit -f`` and on a full tmpfs:
        (SafetensorError("Error while serializing: I/O error: File too large (os error 27)"), errno.EFBIG),
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
        (RuntimeError(TORN_ZIP), errno.EIO),  # torch.save to a path: no errno anywhere
        (_chained(RuntimeError(TORN_ZIP), OSError(errno.EFBIG, "File too large")), errno.EFBIG),  # to a Python file
        (RuntimeError("basic_ios::clear: iostream error"), errno.EIO),
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),  # save_pretrained on a full disk
        (RuntimeError("failed writing: Disk quota exceeded"), errno.EDQUOT),
        (ValueError("not a write"), None),
        (RuntimeError("a bug"), None),
        (_chained(RuntimeError("a bug"), OSError(errno.ENOENT, "No such file")), None),
    ],
)
def test_write_error_reads_the_errno_a_library_gives(tmp_path, raised, code):
    converted = write_error(raised, tmp_path / "last", staging=tmp_path / "last.tmp-1")
    if code is None:
        assert converted is None
    else:
        assert converted.errno == code and converted.filename == str(tmp_path / "last")


def test_write_error_names_the_file_inside_what_is_saved(tmp_path):
    staging = tmp_path / "last.tmp-1"
    raised = OSError(errno.EFBIG, "File too large", str(staging / "policy" / WEIGHTS))
    converted = write_error(raised, tmp_path / "last", staging=staging)
    assert converted.filename == str(tmp_path / "last")
    assert converted.strerror == f"File too large (writing policy/{WEIGHTS})"


def test_staged_dir_renames_into_place_or_leaves_nothing(tmp_path):
    """:func:`selfcorrect.io.staged_dir`: a finished block replaces the destination (or, without ``replace``, is
    refused by an existing one); a failed block leaves the destination as it was and no temporary directory; with
    ``wrap_writes`` a failed write names the destination."""
    dest, umask = tmp_path / "out" / "model", os.umask(0)
    os.umask(umask)
    with staged_dir(dest) as staging:
        assert staging.parent == dest.parent and staging.name.startswith(".model.tmp-")
        assert staging.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
        (staging / "a.txt").write_text("one")
    assert (dest / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError, match="boom"), staged_dir(dest) as staging:
        (staging / "a.txt").write_text("two")
        raise RuntimeError("boom")
    assert (dest / "a.txt").read_text() == "one" and not leftovers(tmp_path)

    with staged_dir(dest, staging=tmp_path / "out" / ".model.partial") as staging:
        (staging / "a.txt").write_text("three")
    assert (dest / "a.txt").read_text() == "three" and sorted(os.listdir(dest.parent)) == ["model"]

    with pytest.raises(UserError, match="already exists"), staged_dir(dest, replace=False) as staging:
        (staging / "a.txt").write_text("four")
    assert (dest / "a.txt").read_text() == "three" and sorted(os.listdir(dest.parent)) == ["model"]

    other = tmp_path / "other"
    with pytest.raises(OSError) as raised, staged_dir(other, wrap_writes=True) as staging:
        raise OSError(errno.EFBIG, "File too large", str(staging / WEIGHTS))
    assert raised.value.filename == str(other) and raised.value.strerror == f"File too large (writing {WEIGHTS})"
    assert not other.exists() and not leftovers(tmp_path)
