"""`fedcoder certs`: the files a multi-machine deployment is set up with."""

import datetime
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from flwr.cli.supernode.register import try_load_public_key

from fedcoder.certs import write_node_keys, write_tls_files
from fedcoder.cli import main


def _verify(files, name: x509.DNSName | x509.IPAddress) -> None:
    store = Store([x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())])
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(datetime.datetime.now(datetime.UTC))
        .build_server_verifier(name)
    )
    verifier.verify(x509.load_pem_x509_certificate(files.server_certificate.read_bytes()), [])


def test_superlink_certificate_is_valid_for_its_hosts_and_loopback(tmp_path):
    files = write_tls_files(tmp_path, ["superlink.example.org", "10.1.2.3"])
    _verify(files, x509.DNSName("superlink.example.org"))
    _verify(files, x509.IPAddress(ipaddress.ip_address("10.1.2.3")))
    # The SuperLink's own ServerApp runtime connects over loopback.
    _verify(files, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _verify(files, x509.DNSName("localhost"))
    with pytest.raises(x509.verification.VerificationError):
        _verify(files, x509.DNSName("elsewhere.example.org"))
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("ca.key*"))  # the CA key is never written


def test_supernode_keys_are_in_the_format_flower_reads(tmp_path):
    keys = write_node_keys(tmp_path, "acme")
    assert try_load_public_key(keys.public_key)  # what `flwr supernode register` does
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    assert private.curve.name == "secp384r1"  # what flower-supernode accepts: a NIST curve
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_certs_command_writes_both_kinds(tmp_path, capsys):
    assert main(["certs", "superlink", "--out", str(tmp_path / "c"), "--host", "sl.example"]) == 0
    assert main(["certs", "supernode", "--out", str(tmp_path / "k"), "--name", "acme"]) == 0
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"ca.crt", "server.pem", "server.key"}
    assert {p.name for p in (tmp_path / "k").iterdir()} == {"acme", "acme.pub"}
    assert "flwr supernode register" in capsys.readouterr().out
