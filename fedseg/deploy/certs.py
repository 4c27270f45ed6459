"""A small certificate authority for one federation, and the SuperNodes' signing keys.

The coordinator creates a CA, signs the TLS certificates of the SuperLink and of the
segmentation service with it, and hands each hospital only the CA certificate (public). Private
keys are written with mode 0600 and never leave the machine that made them. SuperNode
authentication keys are ECDSA P-384 in OpenSSH format, which is what Flower reads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.atomic import write_bytes_atomic

CA_CERT, CA_KEY = "ca.pem", "ca.key"
VALID_DAYS = 825  # the longest lifetime common TLS clients accept for a server certificate


@dataclass(frozen=True)
class ServerCert:
    ca: Path
    cert: Path
    key: Path


def write_private(path: Path, data: bytes) -> Path:
    """Mode 0600 from the first byte on, whole or not at all (``fedseg.atomic``)."""
    return write_bytes_atomic(path, data, mode=0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ensure_ca(directory: str | Path, name: str = "fedseg federation CA") -> tuple[Path, Path]:
    """The CA in ``directory`` (created on first use): (certificate, private key)."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _pem_key(key))
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_server_cert(
    ca_dir: str | Path, out_dir: str | Path, name: str, hosts: list[str]
) -> ServerCert:
    """A TLS server certificate for ``hosts`` (IP addresses or DNS names), signed by the CA."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    return _issue(ca_dir, out_dir, name, ExtendedKeyUsageOID.SERVER_AUTH, _san(hosts))


def issue_client_cert(ca_dir: str | Path, out_dir: str | Path, site: str) -> ServerCert:
    """A TLS client certificate naming ``site`` (its common name), signed by the CA: what a
    hospital presents to the segmentation service, which serves it as that site only."""
    return _issue(ca_dir, out_dir, site, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def _issue(
    ca_dir: str | Path,
    out_dir: str | Path,
    name: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> ServerCert:
    ca_cert_path, ca_key_path = ensure_ca(ca_dir)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    # A CA's key signs certificates, so it is one of the issuer key types (ours: EC P-256).
    ca_key = cast(
        CertificateIssuerPrivateKeyTypes,
        serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None),
    )
    ca_public = cast(CertificateIssuerPublicKeyTypes, ca_cert.public_key())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    write_private(key_path, _pem_key(key))
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ServerCert(ca_cert_path, cert_path, key_path)


def supernode_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (OpenSSH ECDSA P-384): (private, public).

    The private key stays on the hospital's SuperNode; the coordinator registers the public one
    with ``flwr supernode register``. An existing pair is kept.
    """
    directory = Path(directory)
    private, public = directory / f"{name}_ecdsa", directory / f"{name}_ecdsa.pub"
    if private.is_file() and public.is_file():
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    write_bytes_atomic(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode(),
    )
    return private, public


def check_ca_file(path: Path, option: str = "--ca") -> Path:
    """A readable PEM certificate, or a ValueError naming the file (TLS libraries report a
    garbage CA file without its name, or only once a connection fails)."""
    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as err:
        raise ValueError(f"{option} {path}: {err.strerror or err}") from None
    except ValueError:
        raise ValueError(f"{option} {path}: not a PEM certificate (ca.pem from init)") from None
    return path
