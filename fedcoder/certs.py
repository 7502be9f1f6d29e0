"""Credentials for a secure deployment: a TLS CA, the SuperLink's certificate, SuperNode keys.

For local testing and small pilots only: real organisations take the SuperLink
certificate from their own CA. The SuperLink serves the Fleet, Control and
Runtime APIs on one TLS port, so its certificate must name every address that
SuperNodes, the `flwr` CLI and the SuperLink's own SuperExec (which connects on
loopback) use to reach it; `127.0.0.1` and `localhost` are always included.

SuperNode authentication keys are ECDSA P-384 pairs in OpenSSH format, the form
`flower-supernode --auth-supernode-private-key` and `flwr supernode register`
read.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the SuperLink (`--ssl-*`) and for everyone who connects to it."""

    ca_certificate: Path  # SuperNodes' --root-certificates, the CLI's root-certificates
    server_certificate: Path  # flower-superlink --ssl-certfile
    server_key: Path  # flower-superlink --ssl-keyfile


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair."""

    private_key: Path  # flower-supernode --auth-supernode-private-key
    public_key: Path  # flwr supernode register PUBLIC_KEY


def write_tls_files(directory: Path, hosts: Sequence[str] = (), *, days: int = 365) -> TlsFiles:
    """A new CA and a SuperLink certificate it signs, valid for `hosts` plus loopback."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcoder test CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            ca_name,
            server_key.public_key(),
            now,
            days,
        )
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_certificate.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    # The CA key is not written: nothing else is signed with it, so a leaked
    # test directory cannot mint certificates.
    return files


def write_node_keys(directory: Path, name: str) -> NodeKeys:
    """A SuperNode authentication key pair `<name>` / `<name>.pub` (OpenSSH format)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return keys


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_private(path: Path, data: bytes) -> None:
    # Created owner-only from the start, so the key is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
