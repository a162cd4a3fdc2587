"""DHT record schemas: what nodes announce and brokers/drivers read.

Keys (hivemind DHT):
- ``dinet:{model}:block:{i}`` -> subkey peer id -> :class:`BlockRecord` as a dict
- ``dinet:nodes`` -> subkey peer id -> :class:`NodeRecord` as a dict

Records are plain dicts of JSON-compatible values on the wire (hivemind serialises
them with msgpack). :meth:`from_dict` validates every field, because a record comes
from a stranger: an invalid record is rejected with :class:`RecordError` and skipped
by readers, it never crashes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from proto.methods import METHODS

NODES_KEY = "dinet:nodes"
MAX_STR = 256


def block_key(model: str, index: int) -> str:
    return f"dinet:{model}:block:{index}"


class RecordError(ValueError):
    """A DHT record failed validation."""


def _str(d: dict[str, Any], key: str, *, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str) or len(value) > MAX_STR:
        raise RecordError(f"field {key!r} must be a string of at most {MAX_STR} characters")
    return value


def _num(d: dict[str, Any], key: str, *, default: float | None = None, lo: float = 0.0) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordError(f"field {key!r} must be a finite number")
    if value < lo:
        raise RecordError(f"field {key!r} must be >= {lo}")
    return float(value)


def _bool(d: dict[str, Any], key: str, *, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise RecordError(f"field {key!r} must be true or false")
    return value


def _int(d: dict[str, Any], key: str, *, default: int | None = None, lo: int = 0) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise RecordError(f"field {key!r} must be an integer >= {lo}")
    return value


@dataclass(frozen=True)
class HardwareInfo:
    """Measured at node start-up (see HardwareProfile in common.proto for field meanings)."""

    cpu_cores: int = 1
    ram_gb: float = 0.0
    accelerator: str = "cpu"
    gflops: float = 0.0
    mem_bandwidth_gbs: float = 0.0
    net_rtt_ms: float = 0.0
    weight_format: str = "fp32"
    threads: int = 1
    price_per_hour: float = 0.0
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> HardwareInfo:
        if not isinstance(d, dict):
            raise RecordError("hardware must be a mapping")
        return cls(
            cpu_cores=_int(d, "cpu_cores", default=1, lo=1),
            ram_gb=_num(d, "ram_gb", default=0.0),
            accelerator=_str(d, "accelerator", default="cpu"),
            gflops=_num(d, "gflops", default=0.0),
            mem_bandwidth_gbs=_num(d, "mem_bandwidth_gbs", default=0.0),
            net_rtt_ms=_num(d, "net_rtt_ms", default=0.0),
            weight_format=_str(d, "weight_format", default="fp32"),
            threads=_int(d, "threads", default=1, lo=1),
            price_per_hour=_num(d, "price_per_hour", default=0.0),
            description=_str(d, "description", default=""),
        )

    def features(self) -> dict[str, float]:
        """Numeric part of the hardware embedding theta."""
        return {
            "hw.cpu_cores": float(self.cpu_cores),
            "hw.ram_gb": self.ram_gb,
            "hw.gpu": float(self.accelerator != "cpu"),
            "hw.gflops": self.gflops,
            "hw.mem_bandwidth_gbs": self.mem_bandwidth_gbs,
            "hw.net_rtt_ms": self.net_rtt_ms,
            "hw.bf16": float(self.weight_format == "bf16"),
            "hw.int8": float(self.weight_format == "int8"),
            "hw.threads": float(self.threads),
        }


@dataclass(frozen=True)
class NodeRecord:
    """One node as announced under ``dinet:nodes``."""

    peer_id: str
    # host:port of its gRPC BlockService; "" for a whole-model node (e.g. vLLM) that serves no blocks and only
    # takes tasks from its group queue: brokers still see its group, chains never route through it
    address: str
    group: str
    models: tuple[str, ...]
    start_block: int
    end_block: int
    hardware: HardwareInfo = field(default_factory=HardwareInfo)
    throughput_tok_s: float = 0.0
    load: float = 0.0  # active sessions / capacity
    free_cache_bytes: int = 0
    num_blocks: int = 0  # blocks of the whole model (0 = not announced); lets readers see trailing gaps
    # The acceleration methods the node runs per request; empty = not announced, which readers take as
    # "every method" (nodes from before the field existed). A vLLM node is built for one method and
    # announces the few it serves, so brokers route only those to its group.
    methods: tuple[str, ...] = ()
    # its BlockService speaks only TLS with the swarm's private CA (node/blocks/tls.py); absent in records from
    # before the field = plaintext. Drivers route only through peers of their own mode.
    tls: bool = False

    @property
    def serves_blocks(self) -> bool:
        """Whether other nodes can call its BlockService (whole-model, queue-only nodes announce no address)."""
        return bool(self.address)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        d["methods"] = list(self.methods)
        d["hardware"] = self.hardware.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> NodeRecord:
        if not isinstance(d, dict):
            raise RecordError("node record must be a mapping")
        models = d.get("models")
        if not isinstance(models, list | tuple) or not all(
            isinstance(m, str) and len(m) <= MAX_STR for m in models
        ):
            raise RecordError("field 'models' must be a list of strings")
        start, end = _int(d, "start_block"), _int(d, "end_block")
        if end <= start:
            raise RecordError("end_block must be greater than start_block")
        return cls(
            peer_id=_str(d, "peer_id"),
            address=_str(d, "address"),
            group=_str(d, "group"),
            models=tuple(models),
            start_block=start,
            end_block=end,
            hardware=HardwareInfo.from_dict(d.get("hardware", {})),
            throughput_tok_s=_num(d, "throughput_tok_s", default=0.0),
            load=_num(d, "load", default=0.0),
            free_cache_bytes=_int(d, "free_cache_bytes", default=0),
            num_blocks=_int(d, "num_blocks", default=0),
            methods=_methods(d),
            tls=_bool(d, "tls", default=False),
        )


def _methods(d: dict[str, Any]) -> tuple[str, ...]:
    """The optional ``methods`` list: known method names only, no repeats."""
    value = d.get("methods", [])
    if not isinstance(value, list | tuple) or not all(isinstance(m, str) for m in value):
        raise RecordError("field 'methods' must be a list of method names")
    unknown = sorted(set(value) - set(METHODS))
    if unknown:
        raise RecordError(f"field 'methods' names unknown methods {unknown}; known: {', '.join(METHODS)}")
    if len(set(value)) != len(value):
        raise RecordError("field 'methods' repeats a method")
    return tuple(value)


@dataclass(frozen=True)
class BlockRecord:
    """One server of one block, as announced under ``dinet:{model}:block:{i}``."""

    peer_id: str
    address: str
    group: str
    start_block: int
    end_block: int
    throughput_tok_s: float = 0.0
    free_cache_bytes: int = 0
    load: float = 0.0
    tls: bool = False  # the peer speaks only TLS (see NodeRecord.tls); absent = plaintext

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> BlockRecord:
        if not isinstance(d, dict):
            raise RecordError("block record must be a mapping")
        start, end = _int(d, "start_block"), _int(d, "end_block")
        if end <= start:
            raise RecordError("end_block must be greater than start_block")
        return cls(
            peer_id=_str(d, "peer_id"),
            address=_str(d, "address"),
            group=_str(d, "group"),
            start_block=start,
            end_block=end,
            throughput_tok_s=_num(d, "throughput_tok_s", default=0.0),
            free_cache_bytes=_int(d, "free_cache_bytes", default=0),
            load=_num(d, "load", default=0.0),
            tls=_bool(d, "tls", default=False),
        )
