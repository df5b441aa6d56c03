"""The backbone service over TLS on loopback: a throwaway CA, a server certificate for
localhost/127.0.0.1, a device that trusts that CA, and one that trusts another CA."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from plora.clients.grpc_link import Endpoint
from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.cloud_backbone.server import TLSFiles, start_service
from plora.cloud_backbone.service import Limits
from plora.platform.cli.main import main
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device, open_device
from plora.storage.errors import TransportError

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    HAVE_CRYPTOGRAPHY = True
except ImportError:  # fall back on the openssl command line
    HAVE_CRYPTOGRAPHY = False

if not HAVE_CRYPTOGRAPHY and shutil.which("openssl") is None:
    pytest.skip("needs the cryptography package or the openssl command", allow_module_level=True)


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate devices trust
    cert: Path  # the server certificate, signed by the CA
    key: Path  # the server's private key


def _write_with_cryptography(folder: Path, with_server: bool) -> Pki:
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder(subject_name=name(f"plora test CA {folder.name}"), issuer_name=name(f"plora test CA {folder.name}"),
                                public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    if with_server:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder(subject_name=name("localhost"), issuer_name=ca_cert.subject, public_key=key.public_key(),
                                    serial_number=x509.random_serial_number(), **valid)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / "server.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def _write_with_openssl(folder: Path, with_server: bool) -> Pki:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", f"/CN=plora test CA {folder.name}", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    if with_server:
        openssl("req", "-new", *ec_key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
        (folder / "server.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
        )
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "server.pem", "-days", "1", "-sha256", "-extfile", "server.ext")
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def make_pki(folder: Path, with_server: bool = True) -> Pki:
    folder.mkdir(parents=True)
    return (_write_with_cryptography if HAVE_CRYPTOGRAPHY else _write_with_openssl)(folder, with_server)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_server(tiny_checkpoint, pki):
    running = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=5),
                            host="127.0.0.1", port=0, tls=TLSFiles(pki.cert, pki.key))
    yield running
    running.stop(grace_s=1)


def test_a_device_that_trusts_the_ca_enrolls_and_runs_a_forward(tmp_path, tls_server, pki):
    address = f"localhost:{tls_server.port}"
    folder = tmp_path / "dev"
    init_device(folder, address, endpoint=Endpoint(address, ca_file=str(pki.ca)), enroll_token=open_registry().issue_enrollment_token()[1])
    device = open_device(folder)
    try:
        assert device.store.record.endpoint == {"insecure": False, "ca_file": str(pki.ca)}
        with torch.no_grad():
            logits = device.model(torch.tensor([[1, 2, 3]]))
        assert logits.shape == (1, 3, device.model.lm_head.out_features) == (1, 3, len(device.tokenizer))
        assert torch.isfinite(logits).all()
    finally:
        device.close()


def test_a_device_that_trusts_another_ca_is_refused(tmp_path, tls_server):
    other = make_pki(tmp_path / "other-pki", with_server=False)
    address = f"localhost:{tls_server.port}"
    folder = tmp_path / "dev"
    with pytest.raises(TransportError, match="unreachable"):
        init_device(folder, address, endpoint=Endpoint(address, ca_file=str(other.ca)), enroll_token=open_registry().issue_enrollment_token()[1])
    assert not (folder / "device.json").exists() and not (folder / "credentials.json").exists()
    hosted = next(iter(tls_server.service.versions))
    assert tls_server.service.registry.devices_on(hosted) == []  # the handshake failed before Register


def test_a_plain_text_client_gets_nothing_from_a_tls_service(tmp_path, tls_server):
    address = f"127.0.0.1:{tls_server.port}"
    with pytest.raises(TransportError):
        init_device(tmp_path / "dev", address, endpoint=Endpoint(address, insecure=True), enroll_token=open_registry().issue_enrollment_token()[1])


def test_serve_refuses_to_start_without_tls_or_insecure(tiny_checkpoint):
    result = CliRunner().invoke(main, ["backbone", "serve", "--backbone", str(tiny_checkpoint)])
    assert result.exit_code != 0
    assert result.exit_code == 2  # click's usage error, before any backbone is loaded
    assert "give --tls-cert and --tls-key, or --insecure" in result.output


def test_serve_refuses_half_a_tls_pair(tiny_checkpoint, pki):
    result = CliRunner().invoke(main, ["backbone", "serve", "--backbone", str(tiny_checkpoint), "--tls-cert", str(pki.cert)])
    assert result.exit_code == 2
    assert "--tls-cert and --tls-key go together" in result.output
