"""raycpt: continued pre-training of Hugging Face causal LMs, swept with Ray Tune.

The file tree is the architecture; imports only point down this list:

    raycpt/core/      Ray-free: config, metric names, data (read, guard, split, tokenise, pack, mix), models, the
                      loop (`core/train.py`), evaluation (perplexity, probe F1), prepare + base measurement,
                      resource bundles, the memory plan (`core/plan.py`), LoRA via PEFT (`core/adapters.py`). Runs
                      on a box without Ray: `raycpt train CONFIG --no-ray`.
    raycpt/results/   no Ray at import: collect trials from disk, the selection rule, export, the Summary,
                      rendering (terminal, markdown, JSON), live-progress view, plots.
    raycpt/edge/      the Ray edge, thin: where the loop runs (Ray Train worker or one-worker Tune trial), the
                      Tuner (search space, ASHA), the live-progress callback, Ray output + logger callbacks,
                      the checkpoint disk policy.
    raycpt/pipeline.py   the job: open experiment -> prepare + base -> tuner -> analyse, export, plot, print.
    raycpt/cli.py        `raycpt sweep | train | analyze | report | validate | prepare | plan`.
"""

__version__ = "0.1.0"
