"""``NodeConfig``: everything ``dinet-node run`` is told, checked when it is built.

Kept apart from the lifecycle (:mod:`node.daemon`): the CLI and tests build and check a
configuration here, and a bad option is exit 2 at start, before any model loads, any
connection opens or any DHT peer starts. The daemon only runs what this describes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from broker.config import ReputationConfig
from node.blocks.auth import check_swarm_token, swarm_token_from_env
from node.blocks.tls import TlsConfig
from node.engines.vllm_options import WEIGHT_FORMAT_OF_DTYPE, VllmSettings
from node.fence import check_reputation_config
from proto.settings import DEFAULT_AMQP_URL
from proto.topology import DEFAULT_NAMESPACE, validate_name

if TYPE_CHECKING:
    from node.accel.draft import DraftModelConfig

__all__ = ["ENGINES", "WEIGHT_FORMAT_OF_DTYPE", "NodeConfig"]

ENGINES = ("local", "vllm")  # local: this process's torch code (whole model, or the block chain); vllm: a GPU


@dataclass
class NodeConfig:
    """Everything one node needs; each field is a ``dinet-node run`` option."""

    model: str  # local path or hub name, read with from_pretrained
    model_name: str  # the name agents ask for (InferenceRequest.model)
    group: str  # consumer group: the node consumes <namespace>.group.<group>
    amqp_url: str = DEFAULT_AMQP_URL  # from --amqp-url or DINET_AMQP_URL
    namespace: str = DEFAULT_NAMESPACE  # queue name prefix; tests and demos use their own
    prefetch: int = 4  # tasks held (and computed concurrently) at once
    price_per_hour: float = 0.0  # operator-declared price, used for cost budgets
    state_dir: Path | None = None  # node id + dedup ledger; default ~/.local/state/dinet/<namespace>-<group>
    node_id: str = ""  # default: kept in the state dir, made once from the host name
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "float32"  # weights: float32 | bfloat16 | float16
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    max_new_tokens: int = 4096  # largest max_new_tokens accepted
    drain_grace_s: float = 30.0  # on SIGTERM: time running tasks get before they are requeued
    telemetry_lookback_s: float = 24 * 3600.0  # telemetry replayed at start for dedup (0 = off)
    connect_timeout_s: float = 60.0  # keep retrying the first connection to RabbitMQ this long
    # stop consuming while the brokers' reputation ledger (rebuilt here from telemetry) puts this node below
    # reputation.threshold (node/fence.py); same knobs as `dinet-broker run`, so keep them equal
    reputation_fence: bool = True
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    # sharded serving (node.blocks); used when blocks or initial_peers are given
    blocks: tuple[int, int] | None = None  # [start, end) block range this node serves
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join
    host: str = "127.0.0.1"  # gRPC and DHT listen address
    port: int = 0  # gRPC port (0 = any free port)
    dht_port: int = 0  # DHT port (0 = any free port)
    announce_host: str = ""  # address other nodes reach this one at, when not ``host`` (NAT, 0.0.0.0)
    accelerated: bool = False  # serve with node/accel's server: continuous batching + prefix cache
    local_blocks: bool = True  # the driver runs this node's own blocks in-process (node/blocks/local_span.py)
    draft_model: str = ""  # the chain driver's draft model for spec_draft (a local dir, --model's tokenizer)
    draft_weight_format: str = "fp32"  # fp32 | bf16 | int8: how the driver loads the draft model
    # every gRPC call of the block swarm carries it and this node's server refuses calls without it
    # (node/blocks/auth.py); default $DINET_SWARM_TOKEN, "" = open swarm; never logged
    swarm_token: str = field(default_factory=swarm_token_from_env, repr=False)
    tls: TlsConfig | None = None  # the block swarm's gRPC over TLS with its private CA (node/blocks/tls.py)
    engine: str = "local"  # "local" | "vllm" (whole model on a GPU; see node.engines)
    vllm: VllmSettings = field(default_factory=VllmSettings)  # used with engine="vllm"

    def __post_init__(self) -> None:
        validate_name("group name", self.group)
        validate_name("namespace", self.namespace)
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.dtype not in WEIGHT_FORMAT_OF_DTYPE:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(WEIGHT_FORMAT_OF_DTYPE)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and (self.blocks is not None or self.accelerated):
            raise ValueError(
                "--engine vllm serves the whole model on one GPU; drop --blocks and --accelerated (those are the "
                "CPU block chain's). With --initial-peers a vLLM node joins the DHT only to announce its group"
            )
        check_swarm_token(self.swarm_token)
        check_reputation_config(self.reputation)
        self._check_draft_model()

    def _check_draft_model(self) -> None:
        """A draft model must exist and speak --model's token ids; checked here so a typo is exit 2 at start."""
        if not self.draft_model:
            return
        if not self.sharded:
            raise ValueError(
                "--draft-model is for the block chain driver (--blocks / --initial-peers); "
                "with --engine vllm use --vllm-draft-model"
            )
        if not Path(self.draft_model).is_dir():
            raise ValueError(f"--draft-model {self.draft_model}: no such directory")
        from node.accel.draft import check_draft_compatible
        from node.accel.weights import check_weight_format

        check_weight_format(self.draft_weight_format)
        if Path(self.model).is_dir():  # a hub model is checked once downloaded, by the driver
            check_draft_compatible(Path(self.draft_model), Path(self.model))

    @property
    def draft(self) -> DraftModelConfig | None:
        """The driver's draft model configuration (None without --draft-model)."""
        if not self.draft_model:
            return None
        from node.accel.draft import DraftModelConfig

        return DraftModelConfig(Path(self.draft_model), weight_format=self.draft_weight_format)

    @property
    def weight_format(self) -> str:
        """What this node reports as its weight format (hardware embedding, telemetry)."""
        if self.engine == "vllm":
            return self.vllm.weight_format(self.dtype)
        return WEIGHT_FORMAT_OF_DTYPE[self.dtype]

    @property
    def sharded(self) -> bool:
        """Serves blocks over gRPC (local engine with --blocks or --initial-peers)."""
        return self.engine == "local" and (self.blocks is not None or bool(self.initial_peers))

    @property
    def announces_queue_node(self) -> bool:
        """A whole-model node outside the block chain (vLLM) that announces its group in the DHT."""
        return not self.sharded and bool(self.initial_peers)

    def resolved_state_dir(self) -> Path:
        """``--state-dir``, else one directory per namespace, group and served block range.

        The range is in the name so that the nodes of one group serving different spans on one host
        (the usual way to run a swarm on one machine) each get their own directory, hence their own
        key and id; two nodes with the same span still need ``--state-dir`` (the lock says so).
        """
        if self.state_dir is not None:
            return Path(self.state_dir)
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        span = "" if self.blocks is None else f"-blocks-{self.blocks[0]}-{self.blocks[1]}"
        return base / "dinet" / f"{self.namespace}-{self.group}{span}"
