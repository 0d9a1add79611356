"""The Ray edge: thin wrappers that run the core loop on Ray Train / Ray Tune and report back."""
