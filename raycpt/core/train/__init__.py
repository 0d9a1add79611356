"""Training: the loop and its step (loop.py), checkpoints and what they hold (checkpoint.py)."""
