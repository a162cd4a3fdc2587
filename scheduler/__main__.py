"""`dinet-scheduler`: train, evaluate, inspect and export the MetaInf meta-predictor.

    dinet-scheduler synth --out data.csv                         # a synthetic dataset with planted structure
    dinet-scheduler train --dataset data.csv --out model/        # Algorithm 1 -> a versioned model directory
    dinet-scheduler evaluate --dataset data.csv --split task --json --plots figs/
    dinet-scheduler info --model model/
    dinet-scheduler export --state-dir STATE --out rows.parquet  # the broker's meta-training set

The dataset format is documented in docs/scheduler.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from scheduler.dataset import TEXT_COLUMNS, DatasetError

PROG = "dinet-scheduler"
DATASET_HELP = (
    "meta-training set, .csv or .parquet: one row per measurement with columns task, method, hardware, "
    "performance (higher is better); optional runtime_s, task_text, method_text, hardware_text, cost_per_hour "
    "and numeric task.*, method.*, hw.* columns (docs/scheduler.md)"
)


def _model_args(p: argparse.ArgumentParser) -> None:
    from scheduler.config import PredictorConfig

    g = p.add_argument_group("meta-predictor")
    g.add_argument("--no-text", action="store_true",
                   help="leave out the all-MiniLM-L6-v2 embeddings of task/method/hardware text (faster)")
    d = PredictorConfig()
    g.add_argument("--ensemble", type=int, default=d.ensemble, metavar="N",
                   help=f"bootstrap ensemble members (default {d.ensemble})")
    g.add_argument("--rounds", type=int, default=None, metavar="N",
                   help=f"boosting rounds per member (default: tuned; {d.rounds} with --no-tune)")
    g.add_argument("--max-depth", type=int, default=None, metavar="D",
                   help=f"tree depth (default: tuned; {d.max_depth} with --no-tune)")
    g.add_argument("--target", choices=("absolute", "relative"), default=None,
                   help="absolute: learn log performance; relative: learn it relative to the mean of its "
                        f"(task, hardware) cell, plus a level model for that mean (default: tuned; {d.target} "
                        "with --no-tune)")
    g.add_argument("--no-tune", dest="tune", action="store_false",
                   help="use the depth/rounds/eta/target given here instead of choosing them by an inner "
                        "cross-validation on the training rows only (in evaluate: per outer fold, i.e. nested; "
                        "the default, unless one of them is given explicitly)")
    g.add_argument("--tune", dest="tune", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--text-always", action="store_true",
                   help="embed text columns even when they tell apart no rows that the numeric features do not "
                        "(by default such redundant text is left out)")
    g.add_argument("--eta", type=float, default=None, help=f"learning rate (default: tuned; {d.eta} with --no-tune)")
    g.add_argument("--threads", type=int, default=1, help="XGBoost threads (default 1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The configuration the flags describe; sets ``args.tune`` False when a tuned knob was given explicitly."""
    from scheduler.predictor import PredictorConfig

    d = PredictorConfig()
    if any(getattr(args, k) is not None for k in ("rounds", "max_depth", "eta", "target")):
        args.tune = False  # explicit values win over the search
    rounds = d.rounds if args.rounds is None else int(args.rounds)
    max_depth = d.max_depth if args.max_depth is None else int(args.max_depth)
    eta = d.eta if args.eta is None else float(args.eta)
    target = d.target if args.target is None else str(args.target)
    for name, value in (("ensemble", args.ensemble), ("rounds", rounds), ("max-depth", max_depth),
                        ("threads", args.threads)):
        if value < 1:
            raise DatasetError(f"--{name} must be at least 1")
    if eta <= 0:
        raise DatasetError("--eta must be > 0")
    return replace(
        d, use_text=not args.no_text, ensemble=args.ensemble, rounds=rounds, max_depth=max_depth, eta=eta,
        nthread=args.threads, seed=args.seed, text_if_redundant=args.text_always, target=target,
    )


def _load(path: str):  # type: ignore[no-untyped-def]
    from scheduler.dataset import read_dataset

    df = read_dataset(path)
    dropped = df.attrs.get("dropped_rows", 0)
    if dropped:
        print(f"note: dropped {dropped} row(s) without task/method/hardware or a positive performance",
              file=sys.stderr)
    return df


def _text_note(df, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    if not args.no_text and any(c in df.columns for c in TEXT_COLUMNS):
        print("embedding text columns with all-MiniLM-L6-v2 (use --no-text to skip)", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from scheduler.training import train_predictor

    df = _load(args.dataset)
    _text_note(df, args)
    config = _config(args)
    if args.tune:
        from scheduler.tuning import tune

        print("choosing depth/rounds/eta/target by cross-validation on the dataset (--no-tune to skip)",
              file=sys.stderr)
        config = tune(df, config, log=lambda msg: print(msg, file=sys.stderr)).config
    predictor = train_predictor(df, config)
    out = predictor.save(args.out)
    info = predictor.info
    if args.json:
        print(json.dumps({"version": predictor.version, "model_dir": str(out), **info,
                          "importances": dict(list(predictor.feature_importances().items())[:15])}, default=str))
        return 0
    print(f"model {predictor.version} -> {out}")
    print(f"trained on {info['rows']} rows ({info['tasks']} tasks, {len(info['methods'])} methods, "
          f"{len(info['hardware'])} hardware) in {info['train_seconds']:.2f}s; {info['features']} features; "
          f"in-sample log-RMSE {info['in_sample_log_rmse']:.3f}; runtime model: {info['runtime_model']}")
    if info["text_skipped_as_redundant"]:
        print(f"note: left out {', '.join(info['text_skipped_as_redundant'])}: redundant with the numeric "
              "features (--text-always to embed anyway)")
    if info["serving_missing"]:
        print(f"note: the broker cannot fill {', '.join(info['serving_missing'])} at selection time (NaN there)")
    blocks = predictor.importance_by_block()
    print("importance by embedding: " + ", ".join(f"{k} {v:.2f}" for k, v in blocks.items()))
    print("feature importances (share of total gain):")
    for name, value in list(predictor.feature_importances().items())[:15]:
        print(f"  {name:<48} {value:.3f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scheduler.evaluation import evaluate, format_table, write_plots

    df = _load(args.dataset)
    _text_note(df, args)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    config = _config(args)
    chooser = None
    if args.tune:
        from scheduler.tuning import tuned_config_chooser

        chooser = tuned_config_chooser(config, log=log)
    result = evaluate(df, args.split, config, folds=args.folds, seed=args.seed, log=log, choose_config=chooser)
    print(format_table(result))
    if args.plots:
        for path in write_plots(result, args.plots):
            print(f"wrote {path}")
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from scheduler.predictor import MetaPredictor

    predictor = MetaPredictor.load(args.model)
    summary = {"version": predictor.version, **predictor.info, "features": predictor.feature_names,
               "importances": predictor.feature_importances(), "config": predictor.config.to_dict()}
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from scheduler.store import export_state

    path, rows = export_state(args.state_dir, args.out)
    print(f"wrote {rows} rows to {path}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from scheduler.dataset import write_dataset
    from scheduler.synthetic import generate

    df = generate(tasks=args.tasks, hardware=args.hardware, reps=args.reps, noise=args.noise, seed=args.seed,
                  missing=args.missing, discrete=not args.continuous)
    path = write_dataset(df, args.out)
    cells = df.groupby(["task", "hardware"]).ngroups
    print(f"wrote {len(df)} rows ({df['task'].nunique()} tasks x {df['hardware'].nunique()} hardware, "
          f"{cells} cells) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the meta-predictor (Algorithm 1) and save a model directory",
                       description="Train the XGBoost meta-predictor f(psi, phi, theta) -> log performance on a "
                                   "dataset and save a versioned model directory; prints feature importances.")
    p.add_argument("--dataset", required=True, metavar="FILE", help=DATASET_HELP)
    p.add_argument("--out", default="metainf-model", metavar="MODEL_DIR",
                   help="model directory to write (replaced if it exists; default ./metainf-model)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    _model_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="cross-validate MetaInf against oracle, random, expert rules, best single",
                       description="Hold out whole tasks (or hardware) per fold, train on the rest, and for every "
                                   "held-out (task, hardware) cell compare the method MetaInf picks with the "
                                   "oracle, a random pick, the expert rules and the best single method of the "
                                   "training folds. Prints a table; --json adds a JSON last line.")
    p.add_argument("--dataset", required=True, metavar="FILE", help=DATASET_HELP)
    p.add_argument("--split", choices=("task", "hardware"), default="task",
                   help="what a fold holds out (default task)")
    p.add_argument("--folds", type=int, default=10, metavar="K",
                   help="at most K folds: leave-one-out when there are at most K tasks/hardware, else K groups "
                        "(0 = always leave-one-out; default 10)")
    p.add_argument("--json", action="store_true",
                   help="print a last line of JSON with metainf_regret, random_regret, best_single_regret, "
                        "expert_regret, metainf_top1, ...")
    p.add_argument("--plots", metavar="DIR", help="write PNG figures (predicted vs measured, regret per selector)")
    p.add_argument("--quiet", action="store_true", help="no per-fold progress on stderr")
    _model_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="show a model directory's version, training summary and importances")
    p.add_argument("--model", required=True, metavar="MODEL_DIR")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="export a broker's stored meta-training set (telemetry rows)",
                       description="Write the rows an online learner stored under STATE_DIR/data to one file.")
    p.add_argument("--state-dir", required=True, metavar="DIR",
                   help="the learner's state directory (DINET_SCHEDULER_STATE_DIR of the broker)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file: .parquet or .csv")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="write a synthetic dataset with a planted structure",
                       description="Which method wins depends on prompt length, concurrency, output length, "
                                   "shared prefix, repetitiveness and hardware (see scheduler/synthetic.py).")
    p.add_argument("--out", required=True, metavar="FILE", help="output file: .csv or .parquet")
    p.add_argument("--tasks", type=int, default=60, help="number of tasks (default 60)")
    p.add_argument("--hardware", type=int, default=4, help="number of hardware profiles (default 4)")
    p.add_argument("--reps", type=int, default=2, help="measurements per cell and method (default 2)")
    p.add_argument("--noise", type=float, default=0.04, help="log-normal measurement noise sigma (default 0.04)")
    p.add_argument("--missing", type=float, default=0.0, help="share of (cell, method) entries left out")
    p.add_argument("--continuous", action="store_true", help="continuous task features instead of a few levels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from scheduler.predictor import ModelFileError

    try:
        return int(args.func(args))
    except (DatasetError, ModelFileError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. the text encoder could not load
        print(f"{PROG}: error: {exc} (try --no-text)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
