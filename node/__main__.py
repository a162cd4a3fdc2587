"""`dinet-node`: run a consumer node, inspect the swarm, or build a test model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from node.engines.vllm_options import DEFAULT_VLLM_METHOD, VllmSettings
from proto.methods import METHODS
from proto.settings import AMQP_URL_ENV, amqp_url_from_env
from proto.topology import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from broker.config import ReputationConfig
    from node.node_config import NodeConfig


def _make_model(args: argparse.Namespace) -> int:
    from node.model_builder import build_model

    path = build_model(args.out_dir, args.preset, seed=args.seed)
    print(f"wrote {args.preset} model to {path}")
    return 0


def _block_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END (e.g. 0:6), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text!r}: need 0 <= START < END")
    return start, end


def _vllm_settings(args: argparse.Namespace) -> VllmSettings:
    return VllmSettings(
        method=args.vllm_method,
        quantization="" if args.vllm_quantization == "none" else args.vllm_quantization,
        draft_model=args.vllm_draft_model,
        speculative_tokens=args.vllm_speculative_tokens,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_len=args.vllm_max_model_len,
        enforce_eager=args.vllm_enforce_eager,
    )


def _run(args: argparse.Namespace) -> int:
    """Validate the options (and, for --engine vllm, the machine) before loading anything heavy."""
    from node.daemon import run_node
    from node.engines.vllm_runtime import EngineUnavailableError, require_vllm

    try:
        config = _node_config(args)
        if config.engine == "vllm":
            require_vllm()
    except (ValueError, EngineUnavailableError) as exc:
        print(f"dinet-node run: error: {exc}", file=sys.stderr)
        return 2
    return run_node(config)


def _reputation(args: argparse.Namespace) -> ReputationConfig:
    """The broker's ReputationConfig with the two knobs `dinet-broker run` exposes (checked by NodeConfig)."""
    from dataclasses import replace

    from broker.config import ReputationConfig

    reputation = ReputationConfig()
    if args.reputation_threshold is not None:
        reputation = replace(reputation, threshold=args.reputation_threshold)
    if args.reputation_half_life is not None:
        reputation = replace(reputation, half_life_s=args.reputation_half_life)
    return reputation


def _node_config(args: argparse.Namespace) -> NodeConfig:
    from node.blocks.auth import swarm_token_from_env
    from node.blocks.tls import tls_from_args
    from node.node_config import NodeConfig

    if args.swarm_token is not None and args.blocks is None and not args.initial_peers:
        raise ValueError("--swarm-token protects the block swarm; it needs --blocks or --initial-peers")
    tls = tls_from_args(args)  # flags or DINET_TLS_*; partial or bad files: ValueError naming the flag
    if tls is not None and (args.engine != "local" or (args.blocks is None and not args.initial_peers)):
        raise ValueError("--tls-cert/--tls-key/--tls-ca secure the block swarm's gRPC; they need --blocks or "
                         "--initial-peers with --engine local")
    return NodeConfig(
        model=args.model,
        model_name=args.model_name or Path(args.model.rstrip("/")).name,
        group=args.group,
        amqp_url=amqp_url_from_env(args.amqp_url),
        namespace=args.namespace,
        prefetch=args.prefetch,
        price_per_hour=args.price_per_hour,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        node_id=args.node_id,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        max_new_tokens=args.max_new_tokens,
        drain_grace_s=args.drain_grace_s,
        telemetry_lookback_s=args.telemetry_lookback_s,
        reputation_fence=not args.no_reputation_fence,
        reputation=_reputation(args),
        blocks=args.blocks,
        initial_peers=tuple(args.initial_peers or ()),
        host=args.host,
        port=args.port,
        dht_port=args.dht_port,
        announce_host=args.announce_host,
        accelerated=args.accelerated,
        local_blocks=not args.no_local_blocks,
        draft_model=args.draft_model,
        draft_weight_format=args.draft_weight_format,
        swarm_token=swarm_token_from_env(args.swarm_token),
        tls=tls,
        engine=args.engine,
        vllm=_vllm_settings(args),
    )


def _add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from node.blocks.tls import add_tls_arguments

    run = sub.add_parser(
        "run",
        help="load a model and answer the tasks of a consumer group",
        description="Loads the model (the whole model, or with --blocks/--initial-peers a span of its blocks "
        "served over gRPC and chained through the DHT), consumes <namespace>.group.<GROUP>, streams tokens "
        "to each request's agent and reports timings to the telemetry stream. SIGTERM drains: no new tasks, "
        "running ones finish within --drain-grace-s or go back to the queue.",
    )
    run.add_argument("--model", required=True, help="model directory or hub name (read with from_pretrained)")
    run.add_argument("--model-name", default="",
                     help="the name agents ask for (default: the last part of --model)")
    run.add_argument("--group", required=True, help="consumer group to join (e.g. cpu-fp32)")
    run.add_argument("--amqp-url", default=None,
                     help=f"RabbitMQ URL (default: ${AMQP_URL_ENV} or the local default)")
    run.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="queue name prefix (default: dinet)")
    run.add_argument("--prefetch", type=int, default=4, help="tasks held and computed at once (default: 4)")
    run.add_argument("--price-per-hour", type=float, default=0.0,
                     help="your price per hour, used for agents' cost budgets (default: 0)")
    run.add_argument("--state-dir", default=None,
                     help="node id + record of answered requests (default ~/.local/state/dinet/NAMESPACE-GROUP)")
    run.add_argument("--node-id", default="", help="node id (default: made once and kept in the state dir)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weight dtype (default: float32)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (default: one per core; 1 is faster for tiny models on busy hosts)")
    run.add_argument("--max-new-tokens", type=int, default=4096, help="largest max_new_tokens accepted (default: 4096)")
    run.add_argument("--drain-grace-s", type=float, default=30.0,
                     help="on SIGTERM, seconds running tasks get before they are requeued (default: 30)")
    run.add_argument("--telemetry-lookback-s", type=float, default=24 * 3600.0,
                     help="seconds of telemetry replayed at start to skip already-answered tasks "
                     "(default: one day; 0 = off)")
    fence = run.add_argument_group("reputation fence (see docs/node-worker.md)")
    fence.add_argument("--reputation-threshold", type=float, default=None,
                       help="stop consuming while this node's reputation, rebuilt from telemetry as brokers do, "
                       "is below this in [0,1]; use the brokers' value (default 0.5)")
    fence.add_argument("--reputation-half-life", type=float, default=None,
                       help="seconds for past behaviour to lose half its weight; use the brokers' value "
                       "(default 300)")
    fence.add_argument("--no-reputation-fence", action="store_true",
                       help="keep consuming whatever the reputation says (brokers still route around the node)")
    shard = run.add_argument_group("sharded serving (hold only some blocks; see docs/node-serving.md)")
    shard.add_argument("--blocks", type=_block_range, default=None, help="START:END block range to serve")
    shard.add_argument("--initial-peers", nargs="*", default=[],
                       help="DHT multiaddrs to join (local engine: serve blocks in the swarm; --engine vllm: only "
                            "announce this node's group, hardware and methods so brokers reading the DHT see it)")
    shard.add_argument("--host", default="127.0.0.1", help="gRPC/DHT listen address (default: 127.0.0.1)")
    shard.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free)")
    shard.add_argument("--dht-port", type=int, default=0, help="DHT port (0 = any free)")
    shard.add_argument("--announce-host", default="", help="address other nodes reach this one at (NAT)")
    shard.add_argument("--accelerated", action="store_true",
                       help="serve blocks with the accelerated server (continuous batching, prefix cache; "
                       "see docs/methods.md)")
    shard.add_argument("--no-local-blocks", action="store_true",
                       help="as a driver, reach this node's own blocks over its gRPC server like any peer's "
                       "(default: run them in-process, which saves a loopback round trip per token)")
    shard.add_argument("--draft-model", default="",
                       help="draft model directory (same tokenizer as --model) the chain driver drafts spec_draft "
                       "requests with; spec_draft is offered only with one (see docs/methods.md)")
    shard.add_argument("--draft-weight-format", choices=["fp32", "bf16", "int8"], default="fp32",
                       help="how the driver loads --draft-model (default: fp32)")
    shard.add_argument("--swarm-token", default=None,
                       help="shared secret of a private swarm: calls without it are refused, this node's calls "
                       "carry it (default: $DINET_SWARM_TOKEN, which keeps it out of the process list; unset = "
                       "open swarm)")
    add_tls_arguments(shard)  # TLS with the swarm's private CA (docs/node-serving.md, "TLS")
    run.add_argument("--engine", choices=["local", "vllm"], default="local",
                     help="local: dinet's torch code (the whole model, or blocks with --blocks/--initial-peers); "
                     "vllm: the whole model on a CUDA GPU with vLLM (pip install '.[vllm]') (default: local)")
    _add_vllm_arguments(run)
    run.set_defaults(func=_run)


def _add_vllm_arguments(run: argparse.ArgumentParser) -> None:
    gpu = run.add_argument_group("vLLM engine (--engine vllm; see docs/node-worker.md)")
    gpu.add_argument("--vllm-method", choices=list(METHODS), default=DEFAULT_VLLM_METHOD,
                     help="the dinet method the engine is built for; the node serves it and any method with the "
                     f"same vLLM options (default: {DEFAULT_VLLM_METHOD})")
    gpu.add_argument("--vllm-quantization", choices=["none", "int8", "fp8"], default="none",
                     help="none: --dtype weights; int8: an int8-quantized checkpoint; fp8: quantized by vLLM at "
                     "load time from --dtype bfloat16/float16 (default: none)")
    gpu.add_argument("--vllm-draft-model", default="", help="draft model for --vllm-method spec_draft")
    gpu.add_argument("--vllm-speculative-tokens", type=int, default=0,
                     help="tokens proposed per speculative step (default: the method's)")
    gpu.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9,
                     help="share of GPU memory vLLM may use for weights and KV cache (default: 0.9)")
    gpu.add_argument("--vllm-max-model-len", type=int, default=0, help="context length (default: the model's)")
    gpu.add_argument("--vllm-enforce-eager", action="store_true",
                     help="no CUDA graphs: faster start, less memory, slower decoding")


def _add_blocks_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`swarm` and `dht` subcommands, when this build has the sharded-serving package."""
    try:
        from node.blocks import swarm  # type: ignore[attr-defined]
    except ImportError:
        return
    for name in ("add_swarm_parser", "add_dht_parser"):
        add = getattr(swarm, name, None)
        if add is not None:
            add(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinet-node",
        description="A dinet consumer node: serves transformer blocks and answers inference tasks.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    make = sub.add_parser(
        "make-model",
        help="build a small random Llama model + offline tokenizer (for tests and the demo)",
        description="Writes a Llama-architecture model with a fixed seed via save_pretrained, "
        "plus a byte-level BPE tokenizer trained offline. Load it with --model OUT_DIR.",
    )
    make.add_argument("out_dir", help="directory to write the model to")
    make.add_argument("--preset", choices=["tiny", "small", "draft"], default="tiny",
                      help="tiny: seconds to build, for tests; small: ~100M parameters, for benchmarks")
    make.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    make.set_defaults(func=_make_model)
    _add_blocks_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no progress bars in a daemon's log
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
