"""Recipes: one module per pipeline stage, each turning the run config into components, running them and writing
their outputs where :mod:`selfcorrect.rundir` says (on the model of torchtune's recipes).

    sft       supervised fine-tuning on demonstrations (train/sft.py: TRL's SFTTrainer)
    reward    the reward model (train/reward.py: K-wise or pairwise loss, normalised)
    ppo       PPO-ptx (train/ppo.py): setup -> _setup_data, _setup_reward, _setup_model, _setup_optimizer; train
    evaluate  every kept checkpoint and extra model (evaluate/runner.py), live while PPO trains if asked
    report    plots and report.md (evaluate/report.py), also to W&B

Each has ``run(cfg, path)``; ``selfcorrect sft|reward|ppo CONFIG`` and the pipeline (which only plans, skips,
resumes and launches) call them.
"""
