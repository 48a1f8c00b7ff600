"""`python -m selfcorrect` is the `selfcorrect` command (used by `accelerate launch -m selfcorrect`)."""

from selfcorrect.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
