"""Groups that run only some methods (a vLLM group is built for one): the broker never routes them another."""

from __future__ import annotations

import time
from typing import Any

import pytest

from broker.config import BrokerConfig, parse_group_methods
from broker.directory import GroupDirectory
from broker.reputation import ReputationLedger
from broker.routing import Router
from proto import messages_pb2
from proto.errors import NoRouteError
from proto.records import NodeRecord
from proto.topology import Topology
from scheduler.interface import FixedRulePolicy
from tests.test_broker_cli import broker_cli

VLLM = ("continuous_batching", "dynamic_batching")


def request(**fields: Any) -> messages_pb2.InferenceRequest:
    base: dict[str, Any] = {"request_id": "r1", "model": "tiny", "prompt": "hello", "max_new_tokens": 8,
                            "reply_to": Topology("unit").reply_queue("a1")}
    base.update(fields)
    return messages_pb2.InferenceRequest(**base)


def node(peer: str, group: str, methods: tuple[str, ...] = ()) -> NodeRecord:
    return NodeRecord(peer_id=peer, address="127.0.0.1:1", group=group, models=("tiny",), start_block=0,
                      end_block=4, methods=methods)


def router(directory: GroupDirectory) -> Router:
    return Router(FixedRulePolicy(), directory, ReputationLedger(), broker_id="b1")


def test_group_methods_flag_is_parsed_and_checked() -> None:
    assert parse_group_methods("gpu=continuous_batching, dynamic_batching") == ("gpu", VLLM)
    for bad in ("gpu", "gpu=", "=baseline", "gpu=warp_drive", "bad name=baseline"):
        with pytest.raises(ValueError):
            parse_group_methods(bad)
    with pytest.raises(ValueError, match="methods"):
        BrokerConfig(group_methods={"gpu": ("warp_drive",)})


def test_a_group_runs_the_methods_every_announcing_node_runs() -> None:
    directory = GroupDirectory()
    directory.set_dht_records([
        node("a", "gpu", ("continuous_batching", "dynamic_batching", "prefix_caching")),
        node("b", "gpu", VLLM),
        node("c", "gpu"),  # announces nothing: runs every method, does not narrow the group
        node("d", "cpu"),
    ])
    methods = {g.group: g.methods for g in directory.groups_for("tiny")}
    assert methods == {"gpu": frozenset(VLLM), "cpu": frozenset()}


def test_the_operator_narrows_static_and_dht_groups() -> None:
    directory = GroupDirectory({"gpu": ("tiny",)}, group_methods={"gpu": ("continuous_batching",), "cpu": VLLM})
    assert directory.groups_for("tiny")[0].methods == {"continuous_batching"}
    directory.set_dht_records([node("d", "cpu", ("dynamic_batching", "baseline"))])
    by_group = {g.group: g.methods for g in directory.groups_for("tiny")}
    assert by_group["cpu"] == {"dynamic_batching"}  # both the record and the operator allow only that


def test_a_hinted_method_goes_to_a_group_that_runs_it_or_gets_a_typed_error() -> None:
    directory = GroupDirectory({"gpu": ("tiny",), "cpu": ("tiny",)}, group_methods={"gpu": VLLM})
    decision = router(directory).route(request(method_hint="spec_ngram"), now=time.time())
    assert (decision.group, decision.method) == ("cpu", "spec_ngram")
    decision = router(directory).route(request(method_hint="continuous_batching", group_hint="gpu"),
                                       now=time.time())
    assert (decision.group, decision.method) == ("gpu", "continuous_batching")

    only_gpu = GroupDirectory({"gpu": ("tiny",)}, group_methods={"gpu": VLLM})
    with pytest.raises(NoRouteError, match="spec_ngram"):
        router(only_gpu).route(request(method_hint="spec_ngram"), now=time.time())


def test_without_a_hint_the_rule_picks_a_method_the_group_runs() -> None:
    only_gpu = GroupDirectory({"gpu": ("tiny",)}, group_methods={"gpu": VLLM})
    decision = router(only_gpu).route(request(), now=time.time())
    assert decision.group == "gpu" and decision.method in VLLM
    mixed = GroupDirectory({"gpu": ("tiny",), "cpu": ("tiny",)}, group_methods={"gpu": VLLM})
    assert router(mixed).route(request(), now=time.time()).method == "baseline"


def test_the_cli_refuses_an_unknown_method(amqp_url: str, topology: Topology) -> None:
    out = broker_cli("run", "--amqp-url", amqp_url, "--namespace", topology.namespace,
                     "--static-group", "gpu=tiny", "--group-methods", "gpu=warp_drive")
    assert out.returncode == 2 and "warp_drive" in out.stderr
