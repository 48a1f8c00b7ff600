"""``selfcorrect pipeline CONFIG``: SFT -> reward -> PPO -> evaluate every checkpoint -> report, in one run dir.

Each stage's resolved config is hashed (with the hashes of the stages before it) and recorded in
``runs/<name>/pipeline.json`` when the stage finishes. A rerun skips finished stages with the same hash,
continues unfinished ones (PPO from ``ppo/last/``, evaluation from its per-item files), and refuses a
finished stage whose config changed, naming the changed keys, unless ``--force``. ``--from STAGE`` and
``--only STAGE`` rerun stages from scratch. Local data files count by content, not path, so a data directory
that moved is the same run (records made by path before are recorded by content once,
:func:`selfcorrect.pipeline.plan.upgrade_records`). Rerunning ``sft`` while kept PPO checkpoints that are LoRA
adapters on it stay is refused unless ``--force``.

Training stages run as child processes (``<launcher> -m selfcorrect <stage> CONFIG``; the launcher defaults
to this Python and may be ``accelerate launch ...``) that die with the pipeline. Evaluation runs in this
process, either after PPO or while PPO saves later checkpoints (``evaluation.when: during``); either way
each checkpoint is evaluated once.

The modules, in the order the command uses them:

    plan.py        what each stage depends on (its resolved config, local data by content), pipeline.json, and
                   the plan: run, skip or rerun each stage
    checks.py      what can be checked before anything trains
    placement.py   which devices and processes each stage gets
    launch.py      the stages as child processes: started, waited for, stop signals passed on
    run.py         the command: plan, check, print the plan (all a dry run does), run the stages, record them
"""
