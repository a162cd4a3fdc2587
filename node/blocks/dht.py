"""The node's side of the hivemind DHT: announce its records, read the swarm's.

Conventions (keys in :mod:`proto.records`, signing and parsing in
:mod:`proto.dht_schema`, shared with brokers):

- ``dinet:{model}:block:{i}`` for each served block ``i`` -> :class:`BlockRecord`
- ``dinet:nodes`` -> :class:`NodeRecord`

both under the owner-signed subkey of the node, with an expiration ``record_ttl_s``
ahead. :class:`Announcer` re-stores them every ``announce_period_s`` (well before they
expire, with fresh load and free-cache figures), so a node that dies disappears from
routing within one TTL, and a node that stops cleanly stores tombstones and disappears
at once.

hivemind runs the DHT in a child process; every call here goes through an ``MPFuture``
awaited on the event loop, so nothing blocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hivemind
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from node.node_id import NodeIdentityError
from proto.dht_schema import (
    TOMBSTONE,
    make_record_validators,
    owner_subkey,
    parse_owned_block_records,
    parse_owned_node_records,
)
from proto.node_identity import certification, peer_id_of
from proto.process import fork_dht
from proto.records import NODES_KEY, BlockRecord, NodeRecord, block_key

logger = logging.getLogger(__name__)

HEALTH_CHECK_S = 5.0  # a freshly started DHT process must answer one lookup within this


class IdentityInUseError(NodeIdentityError):
    """A live peer of the swarm already runs with this node's identity key (its peer id)."""


@contextlib.contextmanager
def _identity_file(identity: RSAPrivateKey | None) -> Iterator[Path | None]:
    """``identity`` as a libp2p identity file (protobuf ``PrivateKey``, mode 0400, in a private temporary
    directory) for as long as the DHT daemon needs to read it at start; removed afterwards."""
    if identity is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="dinet-identity-") as directory:
        path = Path(directory) / "identity.key"
        encoded = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=identity.to_bytes())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as out:
            out.write(encoded.SerializeToString())
        yield path


def _identity_taken(exc: BaseException) -> bool:
    """hivemind's refusal to start a second live peer with one identity (it has no type of its own)."""
    return isinstance(exc, P2PDaemonError) and "already taken" in str(exc)


class SwarmDHT:
    """A dinet peer of the DHT; create with :meth:`start` (blocking, about half a second)."""

    def __init__(self, dht: hivemind.DHT, validators: list, *, timeout_s: float = 15.0) -> None:
        self.dht = dht
        self.timeout_s = timeout_s  # every DHT operation: a stuck DHT process must not hang its callers
        self.validators = validators
        self.peer_id = str(dht.peer_id)
        self.subkey = owner_subkey(validators, self.peer_id)
        self._impostors_reported: set[str] = set()

    @classmethod
    def start(
        cls,
        *,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
        announce_host: str | None = None,
        identity: RSAPrivateKey | None = None,
    ) -> SwarmDHT:
        """Join the swarm through ``initial_peers`` (or start a new one when empty).

        ``identity`` is the key a node is known by: it signs the node's DHT records, and the DHT's libp2p
        peer id is derived from it, so the peer id *self-certifies* (:mod:`proto.node_identity`): whoever
        holds a result signed with this key can check the node id without the DHT. hivemind refuses to
        start when a live peer already uses the identity, so a copied state directory cannot run twice in
        one swarm. Without ``identity`` (clients: ``swarm``, the agent's owner lookups, tests) the records
        are signed with hivemind's process-wide key and the peer id is random.

        hivemind forks its DHT process from this one (:func:`fork_dht`, which keeps the child's garbage
        collector off this process's objects). The new DHT must be ready within a minute and answer
        one lookup, else it is stopped and started again (three tries): a dead or stuck child is an error,
        never a hang.

        :raises IdentityInUseError: a live peer already uses ``identity`` (not retried).
        :raises RuntimeError: no try started a DHT that answered (the last error is chained).
        """
        validators = make_record_validators(identity)
        kwargs: dict = {"host_maddrs": [f"/ip4/{host}/tcp/{port}"]}
        if announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
        expected_peer_id = None if identity is None else peer_id_of(identity.get_public_key().to_bytes())
        last_error: Exception | None = None
        with _identity_file(identity) as identity_path:
            if identity_path is not None:
                kwargs["identity_path"] = str(identity_path)
            for attempt in range(1, 4):
                dht = hivemind.DHT(
                    initial_peers=list(initial_peers) or None,
                    start=False,
                    client_mode=client_mode,
                    record_validators=validators,
                    **kwargs,
                )
                try:
                    fork_dht(dht)
                    dht.get(NODES_KEY, latest=False, return_future=True).result(timeout=HEALTH_CHECK_S)
                    swarm = cls(dht, validators)
                except Exception as exc:  # TimeoutError from a stuck child, a dead child, or a failed lookup
                    dht.shutdown()
                    if expected_peer_id is not None and _identity_taken(exc):
                        raise IdentityInUseError(
                            f"a live peer of the swarm already runs as {expected_peer_id}, with this node's identity"
                            " key: is another node running from a copy of this state directory?") from exc
                    last_error = exc
                    logger.warning("new DHT process did not answer a lookup (%r), attempt %d of 3", exc, attempt)
                    continue
                if expected_peer_id is not None and swarm.peer_id != expected_peer_id:
                    swarm.shutdown()
                    raise RuntimeError(f"the DHT started as {swarm.peer_id}, not as the peer id of its identity key")
                return swarm
        raise RuntimeError(f"the hivemind DHT process did not start answering after 3 attempts: {last_error!r}") \
            from last_error

    @property
    def maddrs(self) -> list[str]:
        """Multiaddrs other peers can pass as ``initial_peers``."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        self.dht.shutdown()

    async def announce(self, model: str, node: NodeRecord, *, ttl_s: float) -> None:
        """Store the node record and one block record per served block (none for a queue-only node)."""
        expiration = get_dht_time() + ttl_s
        block = BlockRecord(
            peer_id=node.peer_id, address=node.address, group=node.group, start_block=node.start_block,
            end_block=node.end_block, throughput_tok_s=node.throughput_tok_s,
            free_cache_bytes=node.free_cache_bytes, load=node.load, tls=node.tls,
        ).to_dict()
        stores = [(NODES_KEY, node.to_dict())]
        if node.serves_blocks:
            stores += [(block_key(model, i), block) for i in range(node.start_block, node.end_block)]
        await self._store_all(stores, expiration)

    async def withdraw(self, model: str, node: NodeRecord, *, ttl_s: float) -> None:
        """Overwrite this node's records with tombstones (a newer expiration wins)."""
        expiration = get_dht_time() + ttl_s
        blocks = range(node.start_block, node.end_block) if node.serves_blocks else range(0)
        stores = [(NODES_KEY, TOMBSTONE)] + [(block_key(model, i), TOMBSTONE) for i in blocks]
        await self._store_all(stores, expiration)

    async def _store_all(self, stores: list[tuple[str, dict]], expiration: float) -> None:
        futures = [
            self.dht.store(key, value, expiration, subkey=self.subkey, return_future=True) for key, value in stores
        ]
        results = await self._gather(futures)
        failed = [key for (key, _), ok in zip(stores, results, strict=True) if ok is not True]
        if failed:
            logger.warning("DHT store failed for %s (will retry at the next announce)", failed)

    async def block_records(self, model: str, num_blocks: int) -> list[BlockRecord]:
        """Live servers of any block of ``model`` (one record per peer).

        A record written under a key-derived peer id by another key (:func:`proto.node_identity.certification`)
        is dropped: otherwise anyone could announce its own address under a known node's id and take the
        routes, bans and scores meant for that node.
        """
        futures = [self.dht.get(block_key(model, i), latest=True, return_future=True) for i in range(num_blocks)]
        entries = await self._gather(futures)
        now = get_dht_time()
        by_peer: dict[str, BlockRecord] = {}
        impostors: set[str] = set()
        for entry in entries:
            if isinstance(entry, BaseException):
                logger.warning("DHT get failed: %s", entry)
                continue
            for record, owner in parse_owned_block_records(entry, now=now):
                if certification(record.peer_id, owner) is False:
                    impostors.add(record.peer_id)
                    continue
                by_peer[record.peer_id] = record
        if impostors - self._impostors_reported:  # once per id: a lasting forgery must not flood the log
            self._impostors_reported |= impostors
            logger.warning("ignoring block records written under %s by keys those ids do not derive from",
                           ", ".join(sorted(impostors)))
        return list(by_peer.values())

    async def node_records(self) -> list[NodeRecord]:
        return [record for record, _ in await self.owned_node_records()]

    async def owned_node_records(self) -> list[tuple[NodeRecord, bytes]]:
        """Live node records with the key that wrote each (one record per claimant of an id)."""
        (entry,) = await self._gather([self.dht.get(NODES_KEY, latest=True, return_future=True)])
        if isinstance(entry, BaseException):
            logger.warning("DHT get failed: %s", entry)
            return []
        return parse_owned_node_records(entry, now=get_dht_time())

    async def _gather(self, futures: list) -> list:
        """Results (or exceptions) of DHT futures; those not done within ``timeout_s`` become TimeoutError."""
        tasks = [asyncio.ensure_future(_wait(f)) for f in futures]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("%d DHT operation(s) got no answer within %.0f s", len(pending), self.timeout_s)
        return [t.exception() or t.result() if t in done else TimeoutError("DHT timeout") for t in tasks]


async def _wait(future: object) -> object:
    return await future  # type: ignore[misc]  # hivemind's MPFuture is awaitable


class Announcer:
    """Keeps a node's records fresh in the DHT until closed."""

    def __init__(
        self,
        swarm: SwarmDHT,
        model: str,
        make_record: Callable[[], NodeRecord],
        *,
        period_s: float,
        ttl_s: float,
    ) -> None:
        if period_s >= ttl_s:
            raise ValueError(f"announce period {period_s}s must be shorter than the record TTL {ttl_s}s")
        self.swarm = swarm
        self.model = model
        self.make_record = make_record
        self.period_s = period_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Announce once (so the node is routable when this returns), then keep refreshing."""
        await self.swarm.announce(self.model, self.make_record(), ttl_s=self.ttl_s)
        self._task = asyncio.create_task(self._loop(), name="dht-announcer")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.swarm.announce(self.model, self.make_record(), ttl_s=self.ttl_s)
            except Exception:
                logger.exception("announcing to the DHT failed; retrying in %.0f s", self.period_s)

    async def close(self, *, withdraw: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if withdraw:
            try:
                await asyncio.wait_for(self.swarm.withdraw(self.model, self.make_record(), ttl_s=self.ttl_s), 5)
            except Exception as exc:  # the records still expire on their own
                logger.warning("could not withdraw DHT records: %s", exc)
