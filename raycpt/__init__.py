"""raycpt: continued pre-training of Hugging Face causal LMs, swept with Ray Tune."""

__version__ = "0.1.0"
