"""The embedded etcd's certificates: a private CA, etcd's server certificate, the platform's client one.

``ensure_etcd_tls(home)`` makes them on first use under ``<home>/etcd-tls/`` (the folder mode 0700,
every file 0600) and returns their paths.  etcd is started with ``--client-cert-auth`` and this CA as
its only trusted one, so a client without the platform's certificate and key is refused at the TLS
handshake: there is no token to expire or to renew when etcd restarts.

Invariants:
- the CA's private key is never written: it signs the two certificates and is dropped, so nothing
  under the home folder can mint another certificate etcd would accept;
- the set is made whole or not at all: when any file is missing, every file is made anew (a new CA
  too), written to temporary names first; a running etcd keeps the certificates it loaded, so the
  set is only remade while the platform is stopped (``faas up`` or a test fixture making its home);
- the server certificate names ``127.0.0.1`` and ``localhost`` (the only addresses the embedded etcd
  listens on) and also allows client use: etcd's own HTTP gateway dials its gRPC server with it.

Caveat: the certificates are valid for ten years and are not renewed before then; remove the folder
(with the platform stopped) to make a new set.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TLS_DIR = "etcd-tls"
_VALID_DAYS = 3650


@dataclass(frozen=True, slots=True)
class EtcdTlsFiles:
    """Where the files of one embedded etcd's TLS set are."""

    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path
    client_key_file: Path

    @classmethod
    def under(cls, home: Path) -> EtcdTlsFiles:
        folder = home / TLS_DIR
        return cls(
            ca_file=folder / "ca.crt",
            server_cert_file=folder / "server.crt",
            server_key_file=folder / "server.key",
            client_cert_file=folder / "client.crt",
            client_key_file=folder / "client.key",
        )

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.ca_file, self.server_cert_file, self.server_key_file, self.client_cert_file, self.client_key_file)


def ensure_etcd_tls(home: Path) -> EtcdTlsFiles:
    """The TLS set under ``<home>/etcd-tls/``, made first if any of its files is missing."""
    files = EtcdTlsFiles.under(home)
    if all(path.is_file() for path in files.paths):
        return files
    folder = files.ca_file.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    for path, data in _make_set(files).items():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    # The CA last: a set interrupted half way has no ca.crt and is made again next time.
    for path in sorted(files.paths, key=lambda p: p == files.ca_file):
        os.replace(path.with_name(f".{path.name}.{os.getpid()}.tmp"), path)
    return files


def _make_set(files: EtcdTlsFiles) -> dict[Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # a clock a little behind still accepts them
    not_after = now + datetime.timedelta(days=_VALID_DAYS)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "faas embedded platform"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("faas embedded etcd CA")

    def signed_by_ca(subject: x509.Name, key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.CertificateBuilder:
        """A certificate of ``subject``'s ``key``, issued by the CA, valid the whole period."""
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        )

    ca_cert = (
        signed_by_ca(ca_name, ca_key, ca=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def leaf(common_name: str, usages: list[x509.ObjectIdentifier], san: list[x509.GeneralName] | None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            signed_by_ca(name(common_name), key, ca=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )  # fmt: skip
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    server_cert, server_key = leaf(
        "faas embedded etcd",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client_cert, client_key = leaf("faas platform", [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    return {
        files.ca_file: ca_cert.public_bytes(serialization.Encoding.PEM),
        files.server_cert_file: server_cert,
        files.server_key_file: server_key,
        files.client_cert_file: client_cert,
        files.client_key_file: client_key,
    }
