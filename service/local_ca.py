"""A throwaway certificate authority for ``make serve TLS=1`` and the TLS tests: what cert-manager
does on Kubernetes (a CA ``Issuer`` and ``Certificate`` resources), on one machine.

``issue(directory, ...)`` writes a certificate in cert-manager's Secret layout: ``tls.crt``,
``tls.key`` and ``ca.crt``. Leaf certificates carry both server and client usage, so one can serve
the store and present itself to another server under mutual TLS, as a pod's certificate does.
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

from service.tls import TLSFiles

LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class LocalCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "KVCompose local CA", days: int = 30) -> LocalCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (_builder(subject, subject, key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> LocalCA:
        """A CA from a cert-manager CA Certificate's Secret mounted at ``directory`` (tls.crt, tls.key)."""
        directory = Path(directory)
        cert = x509.load_pem_x509_certificate((directory / "tls.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "tls.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ValueError(f"{directory}/tls.key is not the ECDSA key of {directory}/tls.crt")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError(f"{directory}/tls.crt is not a CA certificate (cert-manager: isCA: true)")
        return cls(key, cert)

    def issue(self, directory: Path, names: tuple[str, ...] = LOCAL_NAMES, days: int = 30) -> TLSFiles:
        """A leaf certificate for ``names`` (DNS names or IP addresses) in ``directory``; its files."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # it holds a private key
        key = ec.generate_private_key(ec.SECP256R1())
        alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names]
        cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), self.cert.subject,
                         key.public_key(), days)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        _write(directory / "tls.key", key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()), private=True)
        _write(directory / "tls.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write(directory / "ca.crt", self.cert.public_bytes(serialization.Encoding.PEM))
        return TLSFiles(str(directory / "tls.crt"), str(directory / "tls.key"), str(directory / "ca.crt"))


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
