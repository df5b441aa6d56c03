"""A fleet's own TLS certificates and SuperNode keys: issued when `plora fleet launch` brings
its Flower processes up, and by `plora fleet credentials` for processes started by hand.

A throwaway CA signs one server certificate, for the SuperLink on `hosts`, and is then
forgotten: its private key is never written, so nobody can issue another certificate the
fleet would trust. Each SuperNode gets its own NIST P-384 key pair, which the
SuperLink knows by its public key (`flwr supernode register`); a SuperNode whose key is not
registered is refused. Everything is written owner-only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("127.0.0.1", "localhost")
VALID_FOR = datetime.timedelta(days=30)  # a run's lifetime with room to spare; the CA dies with the run


@dataclass(frozen=True)
class FleetCredentials:
    folder: Path

    @property
    def ca(self) -> Path:
        """The CA certificate every SuperNode, `flwr` command and device trusts."""
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, partition_id: int) -> Path:
        return self.folder / f"supernode-{partition_id:03d}.key"

    def node_public_key(self, partition_id: int) -> Path:
        return self.folder / f"supernode-{partition_id:03d}.pub"


def issue_credentials(folder: Path, nodes: int, hosts: tuple[str, ...] = LOOPBACK) -> FleetCredentials:
    """Write a CA certificate, a server certificate for `hosts` and `nodes` SuperNode key pairs
    into `folder` (created owner-only, or made so)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    credentials = FleetCredentials(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + VALID_FOR)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name(f"plora fleet CA {os.urandom(4).hex()}")
    ca_cert = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder(subject_name=_name(hosts[0]), issuer_name=ca_name, public_key=server_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([_alt_name(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(credentials.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(credentials.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(credentials.server_key, _private_pem(server_key))
    for partition_id in range(nodes):
        # OpenSSH's formats, the only ones Flower reads SuperNode keys in.
        node_key = ec.generate_private_key(ec.SECP384R1())
        _write(credentials.node_key(partition_id), node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        _write(credentials.node_public_key(partition_id), node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return credentials


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
