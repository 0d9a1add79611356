"""Evaluation: held-out perplexity and the probe (evaluate.py), prompted classification (prompting.py),
lm-evaluation-harness tasks (harness.py), generation scores (generation.py), intervals and paired tests
(stats.py). Imports the ground floor, model/ and data/; never the training loop."""
