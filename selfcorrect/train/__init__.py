"""The training stages: SFT, reward model, PPO-ptx."""
