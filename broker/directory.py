"""Which consumer groups are live, and which models they serve.

Two sources, merged:

- the hivemind DHT: nodes announce a :class:`proto.records.NodeRecord` under
  ``dinet:nodes`` (subkey = peer id); records are validated one by one and a bad
  one is skipped, never trusted; groups are formed from the records' ``group`` field;
- a static directory (``--static-group GROUP=MODEL[,MODEL]``) for the walking
  skeleton and the demo, without a DHT.

The routing path reads :meth:`GroupDirectory.groups_for` from memory; a background
task refreshes the DHT view every ``ttl_s`` seconds, so a slow DHT never slows routing.

The DHT view also says who owns each node's record (the RSA key its subkey names and
its values are signed with): :meth:`GroupDirectory.owner_key` is how the reputation
ledger checks that a signed result's key belongs to the node it names
(:mod:`proto.result_signing`). Static groups have no owners. Anyone can write a record under
another node's id with its own key, so one id may have several claimants: the one the id derives
from (:mod:`proto.node_identity`) wins; failing that, the id is *ambiguous* and nobody is credited
for it (:data:`broker.evidence.AMBIGUOUS_OWNER`; logged, and listed by ``dinet-broker status``),
never whichever claimant the DHT happened to list last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.evidence import AMBIGUOUS_OWNER
from proto.node_identity import self_certified_owner
from proto.process import START_TIMEOUT_S, fork_dht
from proto.records import NODES_KEY, HardwareInfo, NodeRecord, RecordError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupInfo:
    """A consumer group as the directory sees it."""

    group: str
    models: frozenset[str]
    nodes: tuple[str, ...] = ()  # peer ids announced in the DHT; empty for a static group
    hardware: HardwareInfo = field(default_factory=HardwareInfo)
    source: str = "static"  # "static" | "dht"
    load: float = 0.0  # mean announced load of its nodes
    methods: frozenset[str] = frozenset()  # the only methods its nodes run; empty = every method


def common_methods(records: Iterable[NodeRecord]) -> frozenset[str]:
    """Methods every announcing node of a group runs (a task may reach any of them through the group's
    queue); nodes that announce none run every method and do not narrow the set."""
    sets = [frozenset(r.methods) for r in records if r.methods]
    return frozenset.intersection(*sets) if sets else frozenset()


def groups_from_records(records: Iterable[NodeRecord]) -> list[GroupInfo]:
    """Fold node records into groups (a group's hardware is that of its first node by peer id)."""
    by_group: dict[str, list[NodeRecord]] = {}
    for record in records:
        by_group.setdefault(record.group, []).append(record)
    groups = []
    for name, members in sorted(by_group.items()):
        members.sort(key=lambda r: r.peer_id)
        groups.append(
            GroupInfo(
                group=name,
                models=frozenset(m for r in members for m in r.models),
                nodes=tuple(r.peer_id for r in members),
                hardware=members[0].hardware,
                source="dht",
                load=sum(r.load for r in members) / len(members),
                methods=common_methods(members),
            )
        )
    return groups


def records_from_dht_value(value: Any) -> list[NodeRecord]:
    """Validate the dict stored under ``dinet:nodes``; bad entries are logged and skipped."""
    records: list[NodeRecord] = []
    if not isinstance(value, dict):
        return records
    for subkey, item in value.items():
        raw = getattr(item, "value", item)
        try:
            records.append(NodeRecord.from_dict(raw))
        except RecordError as exc:
            logger.warning("skipping invalid node record under subkey %r: %s", subkey, exc)
    return records


class DhtNodeReader:
    """Reads node records from a hivemind DHT running in its own process."""

    def __init__(
        self, initial_peers: Sequence[str] = (), *, start_swarm: bool = False, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Start the DHT process (forked from this one by :func:`proto.process.fork_dht`, as the nodes do).

        The fork keeps the child's garbage collector off this process's objects (garbage gRPC objects of a
        process that also runs gRPC clients, as in-process tests do, crashed DHT children finalizing them), and
        a child that dies or hangs at start is an error instead of a broker that waits forever.

        :raises hivemind.p2p.P2PDaemonError: hivemind's own start error, unchanged (unreachable bootstrap
            peers, a malformed multiaddr).
        :raises proto.process.DhtStartError: the DHT process died at start without saying why.
        :raises proto.process.DhtStartTimeout: it was not ready within ``start_timeout_s``; it has been stopped.
        """
        import hivemind  # heavy import, only when a DHT is used

        from proto.dht_schema import make_record_validators

        # Nodes sign their records (RSASignatureValidator); a reader without the same validators
        # cannot even decode the signed values, and could not tell forged ones apart.
        self.dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            client_mode=False,
            start=False,
            record_validators=make_record_validators(),
        )
        try:
            fork_dht(self.dht, timeout_s=start_timeout_s)
        except BaseException:
            self.dht.shutdown()  # a stuck child would outlive the broker's failed start
            raise
        if start_swarm or not initial_peers:
            addresses = " ".join(str(a) for a in self.dht.get_visible_maddrs())
            logger.info("DHT peer started; nodes can join with --initial-peers %s", addresses)

    async def fetch(self) -> list[NodeRecord]:
        return [record for record, _ in await self.fetch_owned()]

    async def fetch_owned(self) -> list[tuple[NodeRecord, bytes]]:
        """Live node records, each with its owner's public key."""
        from hivemind.utils import get_dht_time

        from proto.dht_schema import parse_owned_node_records

        result = await self.dht.get(NODES_KEY, latest=True, return_future=True)
        # drops unsigned or forged subkeys, tombstones of stopped nodes, expired and invalid records
        return parse_owned_node_records(result, now=get_dht_time())

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        self.dht.shutdown()


class GroupDirectory:
    """Live groups per model from the DHT (cached) plus the static groups."""

    def __init__(
        self,
        static_groups: dict[str, tuple[str, ...]] | None = None,
        *,
        reader: DhtNodeReader | None = None,
        ttl_s: float = 3.0,
        group_methods: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        # operator-configured method sets (--group-methods) narrow static and DHT groups alike
        self._group_methods = {g: frozenset(m) for g, m in (group_methods or {}).items()}
        self._static = [
            self._narrow(GroupInfo(group=g, models=frozenset(models)))
            for g, models in sorted((static_groups or {}).items())
        ]
        self._reader = reader
        self._ttl_s = ttl_s
        self._dht_groups: list[GroupInfo] = []
        self._owners: dict[str, frozenset[bytes]] = {}  # peer id -> keys owning a record of it (latest view)
        self._by_model: dict[str, list[GroupInfo]] = {}
        self._task: asyncio.Task[None] | None = None
        self._rebuild()

    def _narrow(self, info: GroupInfo) -> GroupInfo:
        configured = self._group_methods.get(info.group)
        if configured is None:
            return info
        methods = info.methods & configured if info.methods else configured
        return dataclasses.replace(info, methods=methods)

    def _rebuild(self) -> None:
        by_model: dict[str, list[GroupInfo]] = {}
        dht_names = {g.group for g in self._dht_groups}
        # a group announced in the DHT wins over a static entry of the same name
        for info in [*self._dht_groups, *(s for s in self._static if s.group not in dht_names)]:
            for model in info.models:
                by_model.setdefault(model, []).append(info)
        self._by_model = by_model

    def groups_for(self, model: str) -> list[GroupInfo]:
        return self._by_model.get(model, [])

    def all_groups(self) -> list[GroupInfo]:
        seen: dict[str, GroupInfo] = {}
        for infos in self._by_model.values():
            for info in infos:
                seen[info.group] = info
        return [seen[k] for k in sorted(seen)]

    def set_dht_records(self, records: Iterable[NodeRecord], *, owners: Mapping[str, bytes] | None = None,
                        claims: Iterable[tuple[str, bytes]] = ()) -> None:
        """Replace the DHT view (used by the refresher and by tests).

        :param owners: peer id -> the one key owning its record.
        :param claims: (peer id, owner key) for every owned record, several keys per id allowed.
        """
        self._dht_groups = [self._narrow(g) for g in groups_from_records(records)]
        found: dict[str, set[bytes]] = {node: {key} for node, key in (owners or {}).items()}
        for node, key in claims:
            found.setdefault(node, set()).add(key)
        before = set(self.ambiguous_nodes())
        self._owners = {node: frozenset(keys) for node, keys in found.items()}
        for node in sorted(set(self.ambiguous_nodes()) - before):
            logger.warning("%d keys claim node %s in the DHT and its id derives from none of them: "
                           "nobody is credited for it while they do", len(self._owners[node]), node)
        self._rebuild()

    def owner_key(self, node_id: str) -> bytes | None:
        """The key that owns ``node_id``'s DHT record in the latest view: the one the id derives from, else the
        only claimant; :data:`AMBIGUOUS_OWNER` when several claim it and none derives; ``None`` when unknown."""
        keys = self._owners.get(node_id)
        if not keys:
            return None
        certified = self_certified_owner(node_id, keys)
        if certified is not None:
            return certified
        return next(iter(keys)) if len(keys) == 1 else AMBIGUOUS_OWNER

    def ambiguous_nodes(self) -> list[str]:
        """Node ids several keys claim in the latest view, none of which the id derives from (sorted)."""
        return sorted(node for node in self._owners if self.owner_key(node) == AMBIGUOUS_OWNER)

    async def refresh(self) -> None:
        if self._reader is None:
            return
        try:
            owned = await asyncio.wait_for(self._reader.fetch_owned(), timeout=max(5.0, self._ttl_s))
        except Exception as exc:  # keep the last good view; the next refresh may succeed
            logger.warning("DHT refresh failed, keeping the previous view of %d groups: %s",
                           len(self._dht_groups), exc)
            return
        self.set_dht_records([record for record, _ in owned], claims=[(r.peer_id, key) for r, key in owned])

    async def start(self) -> None:
        if self._reader is None:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="directory-refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._reader is not None:
            self._reader.shutdown()
            self._reader = None
