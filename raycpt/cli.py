"""`raycpt sweep | train | analyze | validate | prepare`: a subcommand -> function table, docstrings as help.

Bad input of any kind ends as one line on stderr and exit code 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raycpt.errors import InputError


def _load(args: argparse.Namespace):
    from raycpt.config import load_config

    return load_config(args.config, args.set or [])


def cmd_sweep(args: argparse.Namespace) -> int:
    """Prepare data, measure the base model, sweep with Ray Tune + ASHA, select and export the winner.
    `raycpt sweep --resume EXPERIMENT_DIR` continues an interrupted sweep."""
    from raycpt.config import apply_overrides, config_from_dict, parse_override
    from raycpt.files import read_json
    from raycpt.report import make_console
    from raycpt.sweep import sweep

    if args.resume:
        saved = Path(args.config) / "raycpt_config.json"
        if not saved.exists():
            raise InputError(f"--resume {args.config}: not an experiment dir (no raycpt_config.json); pass the "
                             "<storage_path>/<name> dir of the interrupted sweep")
        raw = apply_overrides(read_json(saved), dict(parse_override(o) for o in args.set or []))
        # the experiment dir is where the sweep lives, wherever it was started from
        raw["storage_path"], raw["name"] = str(Path(args.config).resolve().parent), Path(args.config).resolve().name
        cfg = config_from_dict(raw)
    else:
        cfg = _load(args)
    console = make_console()
    _echo(console, args, cfg)
    summary = sweep(cfg, force=args.force, console=console, verbose=args.verbose, resume=args.resume)
    return 0 if summary["winner"] is not None else 1


def cmd_train(args: argparse.Namespace) -> int:
    """Run one trial's loop (no Tune) on Ray Train with resources.num_workers workers."""
    from raycpt.config import to_dict
    from raycpt.distributed import build_trainer
    from raycpt.files import write_json
    from raycpt.prepare import measure_base, prepare_experiment
    from raycpt.report import make_console, print_base, print_data
    from raycpt.sweep import connect_ray, trial_concurrency

    cfg = _load(args)
    console = make_console()
    _echo(console, args, cfg)
    exp_dir = cfg.experiment_dir()
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_json(exp_dir / "raycpt_config.json", to_dict(cfg))
    with console.status("Preparing model and data"):
        manifest = prepare_experiment(cfg)
    write_json(exp_dir / "data_manifest.json", manifest)
    print_data(console, manifest)
    print_base(console, measure_base(cfg, manifest, exp_dir))
    if (exp_dir / "train" / "run").exists():
        # Ray Train restores a run of the same name from its latest checkpoint: say so instead of surprising
        console.print(f"[yellow]resuming[/] the run in {exp_dir / 'train' / 'run'} from its latest checkpoint "
                      "(remove that dir or --set name=<new> to start fresh)")
    started = connect_ray()
    try:
        import ray

        trial_concurrency(cfg, ray.cluster_resources())  # fails early when the trial cannot fit
        result = build_trainer(cfg, manifest, storage_path=exp_dir / "train", name="run").fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    m = result.metrics or {}
    checkpoint = result.checkpoint.path if result.checkpoint else "-"
    console.print(f"step {m.get('step')}: domain ppl {m.get('eval/domain_ppl', float('nan')):.2f}, general ppl "
                  f"{m.get('eval/general_ppl') or float('nan'):.2f}; checkpoint {checkpoint}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Re-apply the selection rule to a finished or interrupted sweep (no retraining); --export re-exports."""
    from raycpt.analysis import analyze
    from raycpt.config import apply_overrides, config_from_dict, parse_override
    from raycpt.files import read_json
    from raycpt.report import make_console

    exp_dir = Path(args.experiment_dir)
    if not (exp_dir / "raycpt_config.json").exists():
        raise InputError(f"{exp_dir}: not a raycpt experiment dir (no raycpt_config.json)")
    raw = apply_overrides(read_json(exp_dir / "raycpt_config.json"), dict(parse_override(o) for o in args.set or []))
    summary = analyze(exp_dir, config_from_dict(raw), console=make_console(), export=args.export, force=args.force)
    return 0 if summary["winner"] is not None else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Summarise a finished or running sweep from disk (never exports, needs no Ray): table, json or markdown."""
    from raycpt.report import make_console, report_command

    return report_command(Path(args.experiment_dir), args.format, make_console())


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a config (and its --set overrides) and its inputs (model, corpora, labels, storage, resources)
    without tokenising or training; --config-only skips the input checks."""
    import yaml

    from raycpt.config import to_dict
    from raycpt.prepare import preflight

    cfg = _load(args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    if not args.config_only:
        found = preflight(cfg)
        print(f"inputs: {found}")
    print(f"OK: {args.config} is valid")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Fetch the model and corpora, tokenise and pack them into the cache ahead of time."""
    from raycpt.prepare import prepare_experiment
    from raycpt.report import make_console, print_data

    cfg = _load(args)
    console = make_console()
    with console.status("Preparing model and data"):
        manifest = prepare_experiment(cfg)
    print_data(console, manifest)
    console.print(f"ready: model {manifest['model_source']}")
    return 0


def _echo(console, args: argparse.Namespace, cfg) -> None:
    overrides = f" with {' '.join('--set ' + s for s in args.set)}" if args.set else ""
    console.print(f"[bold]raycpt[/] {args.command} {args.config}{overrides} -> {cfg.experiment_dir()}")


COMMANDS = {"sweep": cmd_sweep, "train": cmd_train, "analyze": cmd_analyze, "report": cmd_report,
            "validate": cmd_validate, "prepare": cmd_prepare}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycpt", description="Continued pre-training sweeps on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        if name in ("analyze", "report"):
            p.add_argument("experiment_dir", help="the experiment directory (<storage_path>/<name>)")
        else:
            p.add_argument("config", help="experiment YAML, e.g. experiments/laptop.yaml")
        if name == "analyze":
            p.add_argument("--export", action="store_true", help="export the winner (again)")
        if name == "report":
            p.add_argument("--format", choices=["table", "json", "markdown"], default="table",
                           help="json: stable keys, see raycpt.report.REPORT_SCHEMA; markdown: for pasting into a PR")
        else:
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. "
                           "--set train.lr=3e-4 (repeatable)")
        if name == "sweep":
            p.add_argument("--resume", action="store_true", help="CONFIG is the experiment dir of an interrupted "
                           "sweep: continue it, keeping finished trials")
            p.add_argument("--verbose", action="store_true", help="also show Ray Tune's own progress tables and "
                           "logs (always written to <experiment dir>/ray_output.log)")
        if name == "validate":
            p.add_argument("--config-only", action="store_true", help="check the config alone, not its inputs")
        if name in ("sweep", "analyze"):
            p.add_argument("--force", action="store_true", help="replace an earlier sweep / export")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        message = " ".join(str(err).split("\n"))
        print(f"raycpt: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raycpt: interrupted; finished results stay in the experiment dir", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
