"""TLS configuration is checked at start, with errors naming the flag to fix; DHT records say which peers speak TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from node.accel.serve import main as accel_serve_main
from node.blocks.serve_main import main as serve_main
from node.blocks.tls import TLS_ENV, TlsConfig, add_tls_arguments, tls_from_args, tls_from_values
from proto.records import BlockRecord, NodeRecord, RecordError
from tests.helpers_tls import Ca, make_ca, make_node


@pytest.fixture
def ca(tmp_path: Path) -> Ca:
    return make_ca(tmp_path)


@pytest.fixture(autouse=True)
def _no_tls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in TLS_ENV.values():
        monkeypatch.delenv(var, raising=False)


def test_a_member_config_reads_its_files_once(ca: Ca, tmp_path: Path) -> None:
    cert, key = make_node(ca, tmp_path, "n")
    tls = TlsConfig(cert, key, ca.cert_file)
    assert tls.server_name == "dinet-swarm"
    assert tls.cert_pem == cert.read_bytes() and tls.ca_pem == ca.cert_file.read_bytes()
    assert "BEGIN" not in repr(tls)  # the key never lands in a log line


def test_bad_files_are_refused_naming_the_flag(ca: Ca, tmp_path: Path) -> None:
    cert, key = make_node(ca, tmp_path, "n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    text = tmp_path / "text.pem"
    text.write_text("hello")
    other_cert, other_key = make_node(make_ca(tmp_path / "other", "other"), tmp_path / "other", "o")
    wrong_name, wrong_name_key = make_node(ca, tmp_path, "w", san="not-the-swarm")
    expired, expired_key = make_node(ca, tmp_path, "e", days=-1)
    cases = [
        ((tmp_path / "missing.pem", key, ca.cert_file), "--tls-cert", "cannot read"),
        ((cert, key, tmp_path / "missing-ca.pem"), "--tls-ca", "cannot read"),
        ((text, key, ca.cert_file), "--tls-cert", "not a PEM file"),
        ((garbage, key, ca.cert_file), "--tls-cert", "not a PEM certificate"),
        ((cert, garbage, ca.cert_file), "--tls-key", "not an unencrypted PEM private key"),
        ((cert, ca.cert_file, ca.cert_file), "--tls-key", "not an unencrypted PEM private key"),
        ((cert, other_key, ca.cert_file), "--tls-key", "is not the key of --tls-cert"),
        ((other_cert, other_key, ca.cert_file), "--tls-cert", "not signed by the swarm CA"),
        ((cert, key, cert), "--tls-cert", "not signed by the swarm CA"),  # its own CA
        ((wrong_name, wrong_name_key, ca.cert_file), "--tls-cert", "subjectAltName=DNS:dinet-swarm"),
        ((expired, expired_key, ca.cert_file), "--tls-cert", "expired"),
    ]
    for files, flag, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            TlsConfig(*files)
        assert str(info.value).startswith(flag), info.value
    with pytest.raises(ValueError, match="--tls-server-name"):
        TlsConfig(cert, key, ca.cert_file, server_name="no spaces allowed")


def test_flags_come_together_or_not_at_all(ca: Ca, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = make_node(ca, tmp_path, "n")
    assert tls_from_values("", "", "") is None
    for partial, missing in [((str(cert), "", ""), "--tls-key, --tls-ca"), (("", str(key), str(ca.cert_file)),
                                                                              "--tls-cert")]:
        with pytest.raises(ValueError, match=f"missing {missing}"):
            tls_from_values(*partial)
    with pytest.raises(ValueError, match="--tls-server-name needs"):
        tls_from_values("", "", "", "dinet-swarm")
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser)
    monkeypatch.setenv(TLS_ENV["--tls-key"], str(key))  # the environment fills what the flags leave out
    monkeypatch.setenv(TLS_ENV["--tls-ca"], str(ca.cert_file))
    tls = tls_from_args(parser.parse_args(["--tls-cert", str(cert)]))
    assert tls is not None and tls.key_file == key


@pytest.mark.parametrize("entry", ["serve_main", "accel_serve"])
def test_serving_entries_refuse_partial_tls_with_one_line(
    ca: Ca, tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    cert, _ = make_node(ca, tmp_path, "n")
    args = ["--model", str(tiny_model_path), "--blocks", "0:2", "--tls-cert", str(cert)]
    with pytest.raises(SystemExit) as exited:
        (serve_main if entry == "serve_main" else accel_serve_main)(args)
    assert exited.value.code == 2
    assert "missing --tls-key, --tls-ca" in capsys.readouterr().err


def test_records_say_tls_and_old_records_mean_plaintext() -> None:
    block = BlockRecord(peer_id="p", address="10.0.0.1:5000", group="g", start_block=0, end_block=2, tls=True)
    assert BlockRecord.from_dict(block.to_dict()) == block
    old = block.to_dict()
    del old["tls"]
    assert BlockRecord.from_dict(old).tls is False
    node = NodeRecord(peer_id="p", address="10.0.0.1:5000", group="g", models=("tiny",), start_block=0, end_block=2,
                      tls=True)
    assert NodeRecord.from_dict(node.to_dict()).tls is True
    for bad in ("yes", 1, None):
        with pytest.raises(RecordError, match="'tls'"):
            BlockRecord.from_dict({**block.to_dict(), "tls": bad})
        with pytest.raises(RecordError, match="'tls'"):
            NodeRecord.from_dict({**node.to_dict(), "tls": bad})
