"""TLS for every gRPC channel and port of block serving, with the swarm's own private CA.

Off by default (plaintext, as loopback tests and the demo run). With a :class:`TlsConfig` a node
serves only TLS and every channel it opens (driver -> hops, RTT probes, hop -> hop pushes, the
accelerated driver) is TLS too. :func:`open_channel` and :func:`bind_port` are the only places
in block serving that create a channel or a port, so no site can be left plaintext by accident:
their no-TLS branches are the only ``insecure_channel`` / ``add_insecure_port`` calls left.

Trust model. Peers find each other in the DHT as ``IP:port``, so a certificate cannot name
the address a peer is reached at. Instead the swarm runs a private CA: every node gets a
certificate from it whose subjectAltName is the swarm's name (``dinet-swarm`` unless
``--tls-server-name`` says otherwise), and both ends verify the other's chain against that CA:

- a client checks the server's chain against ``--tls-ca`` and checks the name against the
  swarm name (gRPC's ``grpc.ssl_target_name_override``), not against the IP it dialled;
- a server asks every client for a certificate from the same CA (mutual TLS), so a driver or
  a pushing hop must hold one too.

So holding a certificate signed by the swarm CA *is* swarm membership, and a stranger at a
member's address (a stale DHT record, a hijacked IP) cannot pass for it. All members share one
name, so TLS does not tell members apart; the swarm token (:mod:`node.blocks.auth`) still works
on top of it and, under TLS, no longer crosses the network in clear text. Revocation is by
rotating the CA (there is no CRL check). The CA's key should live off the nodes.

Making a CA and a node certificate (``docs/node-serving.md`` has the same)::

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \\
        -subj "/CN=dinet swarm CA" -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=node1" \\
        -keyout node1.key -out node1.csr
    printf "subjectAltName=DNS:dinet-swarm\\nextendedKeyUsage=serverAuth,clientAuth\\n" > node.ext
    openssl x509 -req -in node1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \\
        -extfile node.ext -out node1.pem
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER_NAME = "dinet-swarm"
# flag -> environment fallback (the flags of dinet-node run, node.blocks.serve_main and node.accel.serve)
TLS_ENV = {
    "--tls-cert": "DINET_TLS_CERT",
    "--tls-key": "DINET_TLS_KEY",
    "--tls-ca": "DINET_TLS_CA",
    "--tls-server-name": "DINET_TLS_SERVER_NAME",
}
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class TlsConfig:
    """A node's TLS identity in the swarm: its certificate and key, the swarm CA, the swarm name.

    Validated at construction, so a bad file is a start-up error naming the flag, never a
    handshake failure at the first request: the files must be readable PEM, the key must be
    the certificate's, unencrypted (gRPC cannot ask for a pass phrase), the certificate must be
    signed by the CA, unexpired, and name ``server_name`` in its subjectAltName (clients verify
    that name). The PEM bytes are read once here; a new certificate needs a restart.

    :raises ValueError: naming the flag to fix.
    """

    cert_file: Path  # --tls-cert: this node's certificate chain (leaf first), PEM
    key_file: Path  # --tls-key: its private key, PEM, unencrypted
    ca_file: Path  # --tls-ca: the swarm CA certificate(s), PEM; peers must chain to it
    server_name: str = DEFAULT_SERVER_NAME  # --tls-server-name: the name in every member's subjectAltName
    cert_pem: bytes = field(init=False, repr=False, compare=False)
    key_pem: bytes = field(init=False, repr=False, compare=False)
    ca_pem: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not _DNS_NAME.match(self.server_name):
            raise ValueError(f"--tls-server-name {self.server_name[:80]!r} is not a DNS name (e.g. dinet-swarm)")
        object.__setattr__(self, "cert_pem", _read("--tls-cert", self.cert_file))
        object.__setattr__(self, "key_pem", _read("--tls-key", self.key_file))
        object.__setattr__(self, "ca_pem", _read("--tls-ca", self.ca_file))
        _check_pem(self)


def _read(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def _check_pem(tls: TlsConfig) -> None:
    """Parse the three files and check they fit together (see :class:`TlsConfig`)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    chain = _certificates("--tls-cert", tls.cert_file, tls.cert_pem)
    cas = _certificates("--tls-ca", tls.ca_file, tls.ca_pem)
    try:
        key = serialization.load_pem_private_key(tls.key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        raise ValueError(f"--tls-key {tls.key_file}: not an unencrypted PEM private key ({exc})") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    leaf = chain[0]
    if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise ValueError(f"--tls-key {tls.key_file} is not the key of --tls-cert {tls.cert_file}")
    if leaf.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise ValueError(f"--tls-cert {tls.cert_file} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")

    def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    # some certificate of the chain must be signed by a CA certificate other than itself: a leaf passed as
    # its own CA is no swarm membership (and peers would reject it anyway)
    if not any(cert != ca and issued_by(cert, ca) for cert in chain for ca in cas):
        raise ValueError(f"--tls-cert {tls.cert_file} is not signed by the swarm CA in --tls-ca {tls.ca_file}")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if tls.server_name not in names:
        raise ValueError(
            f"--tls-cert {tls.cert_file} names {names or 'nothing'} in its subjectAltName, not the swarm name "
            f"{tls.server_name!r}: clients verify that name (--tls-server-name), so issue the certificate with "
            f"subjectAltName=DNS:{tls.server_name}"
        )


def _certificates(flag: str, path: Path, data: bytes) -> list[Any]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{flag} {path}: not a PEM certificate ({exc})") from None
    return certs


# -- the one factory for ports and channels ----------------------------------------------------------


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """This node's certificate, and a demand for a client certificate from the swarm CA (mutual TLS)."""
    return grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem,
                                       require_client_auth=True)


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Trust only the swarm CA, and show this node's certificate to the server."""
    return grpc.ssl_channel_credentials(root_certificates=tls.ca_pem, private_key=tls.key_pem,
                                        certificate_chain=tls.cert_pem)


def bind_port(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Bind ``address`` (``host:port``); TLS only when ``tls`` is given. Returns the port (0 = failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def open_channel(address: str, options: Sequence[tuple[str, Any]], tls: TlsConfig | None) -> grpc.aio.Channel:
    """A channel to a peer at ``address``; with ``tls`` it verifies the peer as a member of the swarm.

    The peer's certificate is checked against the swarm CA and the swarm name
    (``grpc.ssl_target_name_override``), not the address dialled, which no certificate names.
    """
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, channel_credentials(tls),
                                   options=[*options, ("grpc.ssl_target_name_override", tls.server_name)])


# -- command line ------------------------------------------------------------------------------------


def add_tls_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """``--tls-cert/--tls-key/--tls-ca/--tls-server-name`` (a parser or an argument group)."""
    env = TLS_ENV
    parser.add_argument("--tls-cert", default=None,
                        help=f"this node's certificate from the swarm CA, PEM; with --tls-key and --tls-ca the node "
                        f"serves and calls only over TLS (default: ${env['--tls-cert']}; unset = plaintext)")
    parser.add_argument("--tls-key", default=None, help=f"its unencrypted private key, PEM (default: "
                        f"${env['--tls-key']})")
    parser.add_argument("--tls-ca", default=None,
                        help=f"the swarm CA certificate, PEM: peers must hold a certificate it signed "
                        f"(default: ${env['--tls-ca']})")
    parser.add_argument("--tls-server-name", default=None,
                        help=f"the name every member's certificate carries in its subjectAltName (default: "
                        f"${env['--tls-server-name']} or {DEFAULT_SERVER_NAME})")


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS config of the flags, each falling back to its environment variable; None = plaintext.

    :raises ValueError: when only some of cert, key and CA are given, or a file is bad.
    """
    values = {
        flag: (getattr(args, flag[2:].replace("-", "_"), None) or os.environ.get(var, ""))
        for flag, var in TLS_ENV.items()
    }
    return tls_from_values(values["--tls-cert"], values["--tls-key"], values["--tls-ca"],
                           values["--tls-server-name"])


def tls_from_values(cert: str, key: str, ca: str, server_name: str = "") -> TlsConfig | None:
    """None when none of cert, key and CA is given; a :class:`TlsConfig` when all are.

    :raises ValueError: naming the missing flags when only some are given, or the bad file.
    """
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if not any(given.values()):
        if server_name:
            raise ValueError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ValueError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)} "
                         f"(or ${', $'.join(TLS_ENV[m] for m in missing)})")
    return TlsConfig(Path(cert), Path(key), Path(ca), server_name or DEFAULT_SERVER_NAME)
