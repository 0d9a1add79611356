"""`raycpt sweep | train | extend | analyze | report | validate | prepare | augment | plan`: a subcommand -> function
table, docstrings as help. Bad input of any kind ends as one line on stderr and exit code 2; nothing already written
is removed.

Ray is imported only by the commands that run on it (`sweep`, `train`, `extend`, `augment`, `prepare` of a corpus
with several read units): `validate`, `report`, `analyze`, `train --no-ray`, `extend --no-ray` and `prepare --no-ray`
start fast and run where Ray is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import yaml
from rich.console import Console

from raycpt import __version__
from raycpt.core import metrics
from raycpt.core.augment import augment_corpus, check_generator, without_synthetic
from raycpt.core.config import ExperimentConfig, load_config, load_saved_config, to_dict
from raycpt.core.data.shards import map_in_process
from raycpt.core.errors import ExportCheckError, InputError
from raycpt.core.extend import extend_local, plan_extension
from raycpt.core.forecast.plan import plan as memory_plan
from raycpt.core.forecast.plan import render as render_plan
from raycpt.core.prepare import augmented, preflight, prepare_experiment
from raycpt.core.train.loop import run_local
from raycpt.results.export import EXPORT_DIR
from raycpt.results.extension import export_extension
from raycpt.results.format import fixed, make_console
from raycpt.results.plots import write_plots
from raycpt.results.progress import AugmentProgress, PrepareProgress
from raycpt.results.render import print_data, print_summary, report_command
from raycpt.results.suggest import write_suggestions
from raycpt.results.summary import SUMMARY_FILE, analyze, keep_earlier


def cmd_sweep(args: argparse.Namespace) -> int:
    """Prepare data, measure the base model, sweep with Ray Tune + ASHA, select and export the winner.
    `raycpt sweep --resume EXPERIMENT_DIR` continues an interrupted sweep."""
    from raycpt.pipeline import sweep  # imports Ray: see the module docstring

    cfg = load_saved_config(args.config, args.set, relocate=True) if args.resume else load_config(args.config,
                                                                                                  args.set)
    console = make_console()
    _echo(console, args, cfg)
    summary = sweep(cfg, force=args.force, console=console, verbose=args.verbose, resume=args.resume)
    return 0 if summary.winner is not None else 1


def cmd_train(args: argparse.Namespace) -> int:
    """Run one trial's loop (no Tune): on Ray Train with resources.num_workers workers, or in this process with
    --no-ray (no Ray needed, e.g. a GPU box with torch and transformers only)."""
    cfg = load_config(args.config, args.set)
    console = make_console()
    _echo(console, args, cfg)
    if args.no_ray:
        if cfg.augments():
            augment_here(cfg, console)
        last = run_local(cfg, console.print)
    else:
        from raycpt.pipeline import train_one  # imports Ray: see the module docstring

        last = train_one(cfg, console)
    console.print(f"step {last.get(metrics.STEP)}: domain ppl {fixed(last.get(metrics.DOMAIN_PPL))}, general ppl "
                  f"{fixed(last.get(metrics.GENERAL_PPL))}" + (f"; checkpoint {last['checkpoint']}"
                                                               if last.get("checkpoint") else ""))
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    """Continue a sweep's wsd trial (the winner, or --trial ID) from its pre-decay checkpoint to --tokens N total
    training tokens: the same optimizer state and data stream, the peak lr held to the longer run's last stable
    step, then its cool-down (equal to one wsd run of N tokens). Runs on Ray Train like `raycpt train`, or in this
    process with --no-ray; scored on validation and test and exported like the winner, with its lineage, into
    EXPERIMENT_DIR/extend-<trial>-<tokens>/export. Started again after a kill, it resumes where it stopped."""
    ext = plan_extension(args.experiment_dir, args.tokens, args.trial, args.set)
    if (ext.out_dir / EXPORT_DIR).is_dir() and any((ext.out_dir / EXPORT_DIR).iterdir()) and not args.force:
        raise InputError(f"{ext.out_dir / EXPORT_DIR} already holds this extension's export; pass --force to "
                         "overwrite it")
    console = make_console()
    overrides = f" with {' '.join('--set ' + s for s in args.set)}" if args.set else ""
    console.print(f"[bold]raycpt[/] extend {ext.exp_dir}{overrides} -> {ext.out_dir}: trial {ext.trial_id} "
                  f"({ext.tokens_before} tokens trained) from its pre-decay checkpoint at {ext.tokens_at_checkpoint} "
                  f"tokens to {ext.tokens} tokens ({ext.steps} steps); {ext.why}")
    if args.no_ray:
        result = extend_local(ext, console.print)
    else:
        from raycpt.pipeline import extend_on_ray  # imports Ray: see the module docstring

        result = extend_on_ray(ext, console)
    if result.stopped:
        console.print(f"[yellow]stopped[/]: {result.stopped}")
    card = export_extension(ext, result, force=args.force)
    last = result.metrics
    console.print(f"step {last.get(metrics.STEP)}: domain ppl {fixed(last.get(metrics.DOMAIN_PPL))}, general ppl "
                  f"{fixed(last.get(metrics.GENERAL_PPL))}; exported to {ext.out_dir / EXPORT_DIR} "
                  f"(test domain ppl {fixed(card['test'].get(metrics.test_name(metrics.DOMAIN_PPL)))})")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Re-apply the selection rule to a finished or interrupted sweep (no retraining), e.g. with --set
    select.max_forgetting=0.05; --export re-exports. Writes summary.json and plots/ anew and keeps the earlier ones
    as summary-<time>.json and plots-<time>/. --suggest also writes final.yaml (one run at law.target_tokens as the
    sweep recommends it: the CPT law's lr, mix and schedule, or the fallback, for `raycpt train`) and next.yaml (the
    sweep narrowed around it, for `raycpt sweep`)."""
    exp_dir = Path(args.experiment_dir)
    cfg = load_saved_config(exp_dir, args.set)
    summary = analyze(exp_dir, cfg, export=args.export, force=args.force)
    console = make_console()
    print_summary(console, summary)
    kept = keep_earlier(exp_dir)
    if cfg.report.plots:
        try:
            summary.plots = [str(p) for p in write_plots(exp_dir, summary, to_dict(cfg)["select"])]
        except Exception as err:  # a figure is not worth losing the summary over
            console.print(f"[yellow]Plots failed[/] ({type(err).__name__}: {err}); the summary is kept")
    summary.save()
    console.print(f"Wrote {SUMMARY_FILE}" + (" and plots/" if summary.plots else "") + f" in {exp_dir}"
                  + (f"; the earlier ones are kept as {', '.join(p.name for p in kept)}" if kept else ""))
    if args.suggest:
        final, nxt = write_suggestions(exp_dir, cfg, summary)
        console.print(f"Wrote {final} (raycpt train {final}) and {nxt} (raycpt sweep {nxt})")
    return 0 if summary.winner is not None else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Summarise a finished or running sweep from disk (never exports, needs no Ray): table, json or markdown."""
    return report_command(Path(args.experiment_dir), args.format, make_console(), args.set)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a config (and its --set overrides) and its inputs (model, corpora, labels, storage, resources)
    without tokenising or training; --config-only skips the input checks."""
    cfg = load_config(args.config, args.set)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    if not args.config_only:
        found = preflight(cfg)
        if cfg.augments():
            generator = check_generator(cfg)
            state = "written" if augmented(cfg) else "to be written by the augment stage (prepare, sweep, train run it)"
            print(f"data.synthetic: augment: {state} in {cfg.synthetic_source()}; generator {generator} loads")
        for field, size in found["documents"].items():
            mb = f"{size['bytes'] / 1e6:,.1f} MB in " if size["bytes"] else ""  # a streamed hub dataset: unknown
            print(f"{field}: {mb}{size['units']} read unit(s); its start checked (enough text, documents)")
        if found["task"]:
            print(f"eval.task: {found['task']['train']} probe-train and {found['task']['test']} test texts")
    print(f"OK: {args.config} is valid")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Fetch the model and corpora, tokenise and pack them into the cache ahead of time: on Ray Data (RAY_ADDRESS's
    cluster, else a local Ray with --cpus CPUs) when a corpus has several read units, or in this process with
    --no-ray. The blocks are the same either way; a killed prepare resumes from the units and shards it wrote."""
    cfg = load_config(args.config, args.set)
    console = make_console()
    if cfg.augments():  # data.synthetic: augment: the rewrites first, then the data step that reads them
        if args.no_ray:
            augment_here(cfg, console)
        else:
            from raycpt.pipeline import augment  # imports Ray: see the module docstring

            augment(cfg, console, num_cpus=args.cpus)
    with contextlib.ExitStack() as stack:
        mapper = map_in_process
        if not args.no_ray:
            from raycpt.edge.data import RayDataMapper  # imports Ray: see the module docstring

            mapper = stack.enter_context(RayDataMapper(num_cpus=args.cpus, dashboard=False))
        with PrepareProgress(console) as progress:
            manifest = prepare_experiment(cfg, mapper=mapper, on_unit=progress)
    print_data(console, manifest)
    console.print(f"ready: model {manifest.model_source}")
    return 0


def augment_here(cfg: ExperimentConfig, console: Console) -> None:
    """The augment stage in this process (`--no-ray` with `data.synthetic: augment`): the data step without the
    synthetic corpus, then the rewrites, one unit after another."""
    base = without_synthetic(cfg)
    generator = check_generator(base)
    with PrepareProgress(console) as progress:
        manifest = prepare_experiment(base, on_unit=progress)
    with AugmentProgress(console) as progress:
        result = augment_corpus(base, on_unit=progress, manifest=manifest, generator=generator)
    console.print(result.describe())


def cmd_augment(args: argparse.Namespace) -> int:
    """Rewrite the domain corpus's training documents with a generator LM (augment.model, default model.source) in
    augment.styles, augment.copies times each, into a jsonl corpus (<experiment dir>/augment/texts): the data step
    first (cached; the held-out split it fixes and the downstream validation/test texts never reach the generator),
    then the generation on Ray Data (RAY_ADDRESS's cluster, else a local Ray with --cpus CPUs). Deterministic for
    augment.seed; a killed run resumes from the units it finished."""
    from raycpt.pipeline import augment  # imports Ray: see the module docstring

    cfg = load_config(args.config, args.set)
    console = make_console()
    _echo(console, args, cfg)
    augment(cfg, console, num_cpus=args.cpus)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory per worker before anything runs (weights, gradients, AdamW, activations, logits, checkpoint size) for
    resources.strategy and num_workers, from the model's config alone; whether it fits resources.accelerator_type
    (or this host's RAM on CPU) and, if not, what to change. Exit 1 when it does not fit."""
    cfg = load_config(args.config, args.set)
    result = memory_plan(cfg)
    render_plan(make_console(), result)
    return 1 if result.fits is False else 0


def _echo(console, args: argparse.Namespace, cfg) -> None:
    overrides = f" with {' '.join('--set ' + s for s in args.set)}" if args.set else ""
    console.print(f"[bold]raycpt[/] {args.command} {args.config}{overrides} -> {cfg.experiment_dir()}")


COMMANDS = {"sweep": cmd_sweep, "train": cmd_train, "extend": cmd_extend, "analyze": cmd_analyze,
            "report": cmd_report,
            "validate": cmd_validate, "prepare": cmd_prepare, "augment": cmd_augment, "plan": cmd_plan}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycpt", description="Continued pre-training sweeps on Ray.")
    parser.add_argument("--version", action="version", version=f"raycpt {__version__}")
    sub = parser.add_subparsers(dest="command")
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        if name in ("analyze", "report", "extend"):
            p.add_argument("experiment_dir", help="the experiment directory (<storage_path>/<name>)")
        else:
            p.add_argument("config", help="experiment YAML, e.g. experiments/laptop.yaml")
        if name == "analyze":
            p.add_argument("--export", action="store_true", help="export the winner (again)")
            p.add_argument("--suggest", action="store_true", help="write final.yaml (one run at law.target_tokens as "
                           "the sweep recommends it) and next.yaml (the sweep narrowed around it) into the dir")
        if name == "report":
            p.add_argument("--format", choices=["table", "json", "markdown"], default="table",
                           help="json: stable keys, see raycpt.results.render.REPORT_SCHEMA; markdown: for "
                                "pasting into a PR")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
        if name == "sweep":
            p.add_argument("--resume", action="store_true", help="CONFIG is the experiment dir of an interrupted "
                           "sweep: continue it, keeping finished trials")
            p.add_argument("--verbose", action="store_true", help="also show Ray Tune's own progress tables and "
                           "logs (always written to <experiment dir>/ray_output.log)")
        if name == "train":
            p.add_argument("--no-ray", action="store_true", help="run the loop in this process, without Ray")
        if name == "extend":
            p.add_argument("--tokens", type=int, required=True, help="the extended run's total training tokens "
                           "(more than the trial trained; rounded up to whole optimizer steps)")
            p.add_argument("--trial", default=None, help="the trial to continue (default: the sweep's winner)")
            p.add_argument("--no-ray", action="store_true", help="run the loop in this process, without Ray")
        if name == "prepare":
            p.add_argument("--no-ray", action="store_true", help="tokenise in this process, without Ray Data")
        if name in ("prepare", "augment"):
            p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray started for the data "
                           "step (and augment's generators) (default: all; ignored with RAY_ADDRESS)")
        if name == "validate":
            p.add_argument("--config-only", action="store_true", help="check the config alone, not its inputs")
        if name in ("sweep", "analyze", "extend"):
            p.add_argument("--force", action="store_true", help="replace an earlier sweep / export")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        message = " ".join(str(err).split("\n"))
        print(f"raycpt: error: {message}", file=sys.stderr)
        return 2
    except ExportCheckError as err:
        print(f"raycpt: export check failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raycpt: interrupted; finished results stay in the experiment dir", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
