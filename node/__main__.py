"""`dinet-node`: run a consumer node, inspect the swarm, or build a test model."""

from __future__ import annotations

import argparse
import logging
import sys


def _make_model(args: argparse.Namespace) -> int:
    from node.model_builder import build_model

    path = build_model(args.out_dir, args.preset, seed=args.seed)
    print(f"wrote {args.preset} model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinet-node",
        description="A dinet consumer node: serves transformer blocks and answers inference tasks.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser(
        "make-model",
        help="build a small random Llama model + offline tokenizer (for tests and the demo)",
        description="Writes a Llama-architecture model with a fixed seed via save_pretrained, "
        "plus a byte-level BPE tokenizer trained offline. Load it with --model OUT_DIR.",
    )
    make.add_argument("out_dir", help="directory to write the model to")
    make.add_argument("--preset", choices=["tiny", "small"], default="tiny",
                      help="tiny: seconds to build, for tests; small: ~100M parameters, for benchmarks")
    make.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    make.set_defaults(func=_make_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
