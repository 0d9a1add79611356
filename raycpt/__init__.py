"""raycpt: continued pre-training of Hugging Face causal LMs, swept with Ray Tune.

The file tree is the architecture; imports only point down this list:

    raycpt/core/      Ray-free, by role; inside it, imports point down this list too:
        config.py, metrics.py, errors.py, files.py, schedule.py, resources.py, packaged.py   the ground floor:
                      the typed config, metric names, the lr schedules, resource bundles, packaged sources;
        model/        load HF models and tokenizers, LoRA via PEFT, DDP / FSDP2 wrapping, the fused losses;
        data/         read corpora in units, guard, split, tokenise, pack (blocks.py), the mixture, batches;
        eval/         held-out perplexity, the probe and prompted F1, lm-eval tasks, generation scores, statistics;
        prepare.py, augment.py   the data step (+ the base model's scores), the synthetic rewrites;
        train/        the loop (loop.py: `train`, `train_step`), checkpoints;
        forecast/     the memory plan (plan.py), the schedule-aware CPT law (cpt_law.py);
        extend.py     continue a wsd trial from its pre-decay checkpoint.
                      Runs on a box without Ray: `raycpt train CONFIG --no-ray`.
    raycpt/results/   no Ray at import: collect trials from disk, the selection rule, export, the Summary,
                      rendering (terminal, markdown, JSON), live-progress view, plots.
    raycpt/edge/      the Ray edge, thin: where the loop runs (Ray Train worker or one-worker Tune trial), the
                      Tuner (search space, ASHA), the live-progress callback, Ray output + logger callbacks,
                      the checkpoint disk policy.
    raycpt/pipeline.py   the job: open experiment -> prepare + base -> tuner -> analyse, export, plot, print.
    raycpt/cli.py        `raycpt sweep | train | extend | analyze | report | validate | prepare | augment | plan`.
"""

__version__ = "0.1.0"
