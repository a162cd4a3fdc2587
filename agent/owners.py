"""Whose answer is it: the agent confirms that a result's signer owns the node id the result names.

A node signs its results with the key that owns its DHT records (:mod:`proto.result_signing`); the
signature alone proves only that *some* key signed, and anyone can run ``dinet-node run --node-id
<another node's id>``. The binding of a node id to a key lives in one place: the owner subkey of the
node's record under ``dinet:nodes`` (:mod:`proto.dht_schema`), which only that key can write.

Design. The agent may join the DHT itself (``AgentConfig.initial_peers``, ``dinet-agent submit
--initial-peers``) and read owner keys there, as the broker's directory does. The other option, the
broker passing owner keys along, was rejected: the broker routes to a group, not to a node, so it
cannot know which node will answer, and anything it sent would reach the agent's reply queue, which
every node can publish to as well (nodes send their results there): an impostor could forge the
broker's message as easily as its own answer. Brokers have no signing key to fix that; the DHT record
is already signed by its owner, so the agent checks the source the broker checks.

Decision (:func:`signer_confirmation`): True when the node id is the peer id of the signer's key
(:mod:`proto.node_identity`: self-certifying, no lookup needed), or the signer is the one key owning the
node's record; False when the id has the key-derived form (every node of this version) and derives from
another key (no lookup needed either, so agents without a DHT refuse such impostors too); False
when one of the record's owners is the key the node id derives from and the signer is
not (an impostor beside a self-certifying node: settled whatever the number of claimants);
False when the owners are known and the signer is none of them; None when it cannot be told (no DHT
configured, no live record for that node id, the lookup failed or timed out, or several keys claim the
id and the signer is one of them: the DHT cannot say which is genuine). A False answer from the DHT is re-checked
against a fresh view first (a node restarted with a new key; records change), then refused by the
agent (:class:`SignerNotOwnerError`, a recoverable node failure like an invalid signature): an answer
whose node lies about who it is should not be handed over as anyone's, and callers who never look at
``signer_confirmed`` stay protected. None is accepted and marked, so agents without a DHT work as before.

The owner map is fetched whole (one ``get`` of ``dinet:nodes`` answers for every node), cached for
``ttl_s``, shared by concurrent lookups, and every wait is bounded by ``timeout_s``: a slow or broken
DHT makes results unconfirmed, never late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from proto.node_identity import certification, self_certified_owner
from proto.process import START_TIMEOUT_S, fork_dht
from proto.records import NODES_KEY, NodeRecord
from proto.result_signing import ResultSignatureError

logger = logging.getLogger(__name__)

OwnerMap = dict[str, frozenset[bytes]]  # node id -> public keys (OpenSSH form) owning a live record of it
FetchOwners = Callable[[], Awaitable[OwnerMap]]


class SignerNotOwnerError(ResultSignatureError):
    """A validly signed result whose signer does not own the DHT record of the node it names.

    Recoverable: send the request again; another node (or the named one itself) may answer it.
    """


class DhtJoinError(ConnectionError):
    """The agent could not join the DHT it was configured with (``initial_peers``)."""


def signer_confirmation(signer_key: bytes, owners: frozenset[bytes] | None, *, node_id: str = "") -> bool | None:
    """Whether ``signer_key`` owns the node whose record owners are ``owners`` (see the module docstring).

    :param owners: the keys owning a live record of the node; None or empty = not known.
    :param node_id: the node the result names; "" skips the self-certification checks.
    """
    if not signer_key:
        return None
    certified = certification(node_id, signer_key)
    if certified is not None:  # the id alone decides: it derives from this key, or from another one
        return certified
    if not owners:
        return None
    if node_id and self_certified_owner(node_id, owners) is not None:
        return False  # the id derives from another claimant's key: this signer cannot be the node
    if signer_key not in owners:
        return False
    return True if len(owners) == 1 else None


def owners_by_node(owned: Iterable[tuple[NodeRecord, bytes]]) -> OwnerMap:
    """Fold ``(record, owner key)`` pairs (:func:`proto.dht_schema.parse_owned_node_records`) into a map."""
    found: dict[str, set[bytes]] = {}
    for record, key in owned:
        found.setdefault(record.peer_id, set()).add(key)
    return {node: frozenset(keys) for node, keys in found.items()}


def check_initial_peers(peers: Sequence[str]) -> tuple[str, ...]:
    """Cheap syntax check of DHT multiaddrs (hivemind parses them fully when the DHT starts).

    :raises ValueError: naming the bad entry and the expected form.
    """
    if isinstance(peers, str):
        raise ValueError(f"initial peers are a list of multiaddrs, not one string: write ({peers!r},)")
    for peer in peers:
        if not isinstance(peer, str) or not peer.startswith("/") or "/p2p/" not in peer:
            raise ValueError(f"initial peer {peer!r} is not a DHT multiaddr; expected the form "
                             "/ip4/<host>/tcp/<port>/p2p/<peer id>, as a node or broker prints it")
    return tuple(peers)


class DhtOwnerSource:
    """A client-mode hivemind DHT peer (its own process) that reads node records and their owners."""

    def __init__(self, initial_peers: Sequence[str], *, start_timeout_s: float = START_TIMEOUT_S) -> None:
        """Join the DHT through ``initial_peers`` (forked by :func:`proto.process.fork_dht`, as brokers do).

        Client mode: an agent reads records and serves none, so it needs no reachable address.

        :raises ValueError: a malformed multiaddr. :raises DhtJoinError: the DHT did not start or join.
        """
        import hivemind  # heavy import, only for agents that configure a DHT
        from hivemind.utils.multiaddr import Multiaddr

        from proto.dht_schema import make_record_validators

        for peer in check_initial_peers(initial_peers):
            try:
                Multiaddr(peer)
            except ValueError as exc:
                raise ValueError(f"initial peer {peer!r} is not a valid multiaddr: {exc}") from exc
        # nodes sign their records: without the same validators their values do not even decode
        self.dht = hivemind.DHT(initial_peers=list(initial_peers), client_mode=True, start=False,
                                record_validators=make_record_validators())
        try:
            fork_dht(self.dht, timeout_s=start_timeout_s)
        except Exception as exc:
            self.dht.shutdown()
            raise DhtJoinError(f"could not join the DHT through {', '.join(initial_peers)}: {exc!r}; check "
                               "that a node or broker is running there") from exc

    async def fetch(self) -> OwnerMap:
        """Owners of every live node record (forged, unsigned, expired and invalid records are dropped)."""
        from hivemind.utils import get_dht_time

        from proto.dht_schema import parse_owned_node_records

        entry: Any = await self.dht.get(NODES_KEY, latest=True, return_future=True)
        return owners_by_node(parse_owned_node_records(entry, now=get_dht_time()))

    def shutdown(self) -> None:
        self.dht.shutdown()


class OwnerDirectory:
    """Owner keys by node id, cached for ``ttl_s``, every lookup bounded by ``timeout_s``.

    :param fetch: returns the whole owner map (:meth:`DhtOwnerSource.fetch`, or a fake in unit tests).
    :param min_refresh_s: a lookup that could not confirm re-fetches only when the view is older than
        this, so a stream of impostor answers costs at most one DHT query per ``min_refresh_s``.
    """

    def __init__(self, fetch: FetchOwners, *, ttl_s: float = 10.0, timeout_s: float = 2.0,
                 min_refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        for name, value in (("ttl_s", ttl_s), ("timeout_s", timeout_s), ("min_refresh_s", min_refresh_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._owners: OwnerMap = {}
        self._fetched_at: float | None = None
        self._failed_at: float | None = None  # the last fetch failed (or timed out) then
        self._refresh: asyncio.Task[None] | None = None  # the one fetch in flight, shared by every waiter
        self.failures = 0

    def _age(self) -> float:
        return float("inf") if self._fetched_at is None else self._clock() - self._fetched_at

    async def _refreshed(self) -> None:
        """Fetch a new view (or join the fetch in flight); bounded: a slow DHT leaves the old view.

        The fetch itself is bounded by ``timeout_s`` and a failed one is not retried for ``min_refresh_s``,
        so a broken DHT delays at most one result per ``min_refresh_s``, by at most ``timeout_s``.
        """
        if self._refresh is None or self._refresh.done():
            if self._failed_at is not None and self._clock() - self._failed_at < self._min_refresh_s:
                return
            self._refresh = asyncio.get_running_loop().create_task(self._run_fetch(), name="agent-owner-fetch")
        await asyncio.shield(self._refresh)  # never raises: _run_fetch catches and bounds everything

    async def _run_fetch(self) -> None:
        try:
            owners = await asyncio.wait_for(self._fetch(), timeout=self._timeout_s)
        except Exception as exc:  # keep the old view; results stay unconfirmed until the DHT answers
            self.failures += 1
            self._failed_at = self._clock()
            logger.warning("could not read node owners from the DHT within %.1f s (%r); results stay unconfirmed",
                           self._timeout_s, exc)
            return
        self._owners, self._fetched_at, self._failed_at = owners, self._clock(), None

    async def owners(self, node_id: str) -> frozenset[bytes] | None:
        """Keys owning ``node_id``'s live record in a view at most ``ttl_s`` old; None when not known."""
        if self._age() > self._ttl_s:
            await self._refreshed()
        return self._owners.get(node_id)

    async def confirm(self, node_id: str, signer_key: bytes) -> bool | None:
        """:func:`signer_confirmation` for a result; anything but True is re-checked on a fresh view first."""
        certified = certification(node_id, signer_key)
        if certified is not None:
            return certified  # no lookup: the node id is a hash of the signer's key, or of another key
        verdict = signer_confirmation(signer_key, await self.owners(node_id), node_id=node_id)
        if verdict is not True and self._age() > self._min_refresh_s:
            await self._refreshed()
            verdict = signer_confirmation(signer_key, self._owners.get(node_id), node_id=node_id)
        return verdict

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh
            self._refresh = None


def not_owner_refusal(request_id: str, node_id: str) -> SignerNotOwnerError:
    """The error the caller gets for an answer signed by a key that does not own the node it names."""
    return SignerNotOwnerError(
        f"the result of request {request_id} names node {node_id!r} but was signed by a key that does not "
        "own that node (its id derives from another key, or another key owns its DHT record: another node "
        "answering in its name), so it was refused; send the request again, and report the group that "
        "answered if it happens again"
    )
