"""`dinet-agent`: submit a prompt to a dinet deployment and stream the answer to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING

from agent.owners import DhtJoinError
from proto.errors import DinetError
from proto.settings import AMQP_URL_ENV, amqp_url_from_env
from proto.topology import DEFAULT_NAMESPACE, DEFAULT_PRIORITY, PRIORITIES

if TYPE_CHECKING:
    from agent.results import GenerationResult


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinet-agent",
        description="A dinet client: sends inference requests through RabbitMQ and prints the answers.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser(
        "submit",
        help="send one prompt and stream the generated text",
        description="Publishes one request and prints its tokens as they arrive, then a one-line summary "
        "(tokens, time to first token, tokens/s, node, method). Exits 1 with the typed error's message when "
        "the network answers with an error, 2 on a usage error, 3 when nothing comes back in time.",
    )
    submit.add_argument("prompt", help="the text to continue")
    submit.add_argument("--model", required=True, help="model name, as nodes announce it (dinet-node run --model-name)")
    submit.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    submit.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    submit.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    submit.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    submit.add_argument("--priority", choices=PRIORITIES, default=DEFAULT_PRIORITY,
                        help=f"priority class (default: {DEFAULT_PRIORITY})")
    submit.add_argument("--budget", type=float, default=0.0, help="most the request may cost; 0 = no limit")
    submit.add_argument("--deadline-s", type=float, default=None,
                        help="answer within this many seconds or fail with deadline_exceeded")
    submit.add_argument("--timeout", type=float, default=120.0,
                        help="give up waiting after this many seconds (default: 120)")
    submit.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    submit.add_argument("--agent-id", default=None,
                        help="name of this agent's durable reply queue (default: a fresh one, deleted at exit)")
    submit.add_argument("--amqp-url", default=None, help=f"RabbitMQ URL (default: ${AMQP_URL_ENV} or the local one)")
    submit.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                        help="DHT multiaddrs to join (as a node or broker prints them) to confirm that the answer's "
                        "signer owns the node id it names; an answer signed by another key is refused. Without "
                        "it the answer is shown with 'signer unconfirmed'")
    submit.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"deployment namespace (default: "
                        f"{DEFAULT_NAMESPACE})")
    submit.set_defaults(func=_submit)
    return parser


async def _submit_async(args: argparse.Namespace) -> int:
    from agent.client import Agent
    from agent.config import AgentConfig

    config = AgentConfig(amqp_url=amqp_url_from_env(args.amqp_url), namespace=args.namespace,
                         initial_peers=tuple(args.initial_peers))
    if args.agent_id:
        config.agent_id = args.agent_id
    else:
        config.delete_reply_queue_on_close = True
    async with Agent(config=config) as agent:
        generation = agent.generate(
            model=args.model,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            priority=args.priority,
            budget=args.budget,
            deadline_s=args.deadline_s,
            timeout=args.timeout,
        )
        streamed = ""
        async for chunk in generation:
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                streamed += chunk.text
        result = await generation.result()
    if args.json:
        print(json.dumps({"ok": True, **result.to_dict()}))
    else:
        sys.stdout.write(closing_text(result, streamed))
    return 0


def closing_text(result: GenerationResult, streamed: str) -> str:
    """What the terminal gets after the streamed text: the rest of the answer, then the summary line.

    When the stream disagreed with the result, the text already on screen is not the answer and cannot
    be taken back: a marked line says so, and the whole answer follows it (the exit code stays 0: the
    result itself is good; ``--json`` carries ``stream_consistent`` for scripts).
    """
    if not result.stream_consistent:
        source = "signed" if result.signed else "unsigned"
        return (
            f"\n-- WARNING: the streamed text above is NOT the answer: it left the {source} result at token "
            f"{result.stream_diverged_at} (a task redelivered to another node, or chunks altered on the way). "
            f"The answer:\n{result.text}\n-- {result.summary()}\n"
        )
    rest = result.text[len(streamed):] if result.text.startswith(streamed) else ""
    return f"{rest}\n-- {result.summary()}\n"


def _submit(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_submit_async(args))
    except DinetError as exc:
        _report_error(args, exc.code_name.lower(), str(exc))
        return 1
    except TimeoutError as exc:
        _report_error(args, "timeout", str(exc))
        return 3
    except DhtJoinError as exc:  # a ConnectionError, but not RabbitMQ's
        _report_error(args, "dht", str(exc))
        return 3
    except (ConnectionError, OSError) as exc:
        _report_error(args, "connection", f"{exc}; is RabbitMQ running? (scripts/setup.sh starts it)")
        return 3
    except ValueError as exc:
        _report_error(args, "usage", str(exc))
        return 2


def _report_error(args: argparse.Namespace, kind: str, message: str) -> None:
    if args.json:
        print(json.dumps({"ok": False, "error": kind, "message": message}))
    print(f"\ndinet-agent: error: {kind}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
