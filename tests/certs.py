"""A throwaway self-signed certificate for tests that serve https:// and wss://."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path | str) -> tuple[str, str]:
    """``(certfile, keyfile)``: an EC P-256 certificate for localhost and
    127.0.0.1, valid for a day, written into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = d / "cert.pem", d / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def trusting(certfile: str) -> ssl.SSLContext:
    """A client context that verifies the server against this one certificate
    (hostname included): the test proves TLS works, it does not switch checks off."""
    return ssl.create_default_context(cafile=certfile)


def https_ready(port: int) -> bool:
    """Whether ``https://127.0.0.1:port/healthz`` answers 200 (a ``ready`` for
    ServerProcess.start; the certificate is checked by the tests themselves)."""
    try:
        with urllib.request.urlopen("https://127.0.0.1:%d/healthz" % port, timeout=1,
                                    context=ssl._create_unverified_context()) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False
