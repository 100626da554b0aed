"""TLS certificates for the SuperLink and keys for SuperNode authentication.

The files an operator otherwise makes with openssl and ssh-keygen
(docs/telemetry.md), made with the ``cryptography`` package (a Flower
dependency). ``shoal lab render`` makes them for a deployment; the tests make
throw-away ones for loopback in their tmp directories.

* ``ca.pem``: a self-signed CA (its private key is not kept: nothing more is
  ever signed with it); ``server.pem`` / ``server.key``: the SuperLink's
  certificate for the given IP addresses (and localhost), signed by that CA.
  The fedserver refuses a certificate that does not name 127.0.0.1
  (:func:`shoal.daemons.fedserver.daemon.check_names_loopback`): pass it among
  the addresses unless the certificate is meant to be refused.
* per node, ``<name>`` (OpenSSH private key, EC P-384) and ``<name>.pub``
  (OpenSSH public key), the format ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["make_node_key", "make_tls"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # touch's mode is masked by the umask; the key must not be readable even briefly
    path.write_bytes(data)


def make_tls(directory: Path, ip: str | Sequence[str] = "127.0.0.1", *, days: float = 1.0,
             ca_name: str = "shoal test CA") -> dict[str, Path]:
    """-> {"ca": ca.pem, "cert": server.pem, "key": server.key} for a SuperLink on ``ip``.

    ``ip`` is one address or several: each becomes an IP subjectAltName (the
    first is also the subject's common name). Valid from 5 minutes ago for ``days``.
    """
    ips = [ip] if isinstance(ip, str) else list(ip)
    if not ips:
        raise ValueError("make_tls: at least one IP address")
    addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in ips))
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.IPAddress(a) for a in addresses]
    names.append(x509.DNSName("localhost"))
    cert = (x509.CertificateBuilder().subject_name(_name(str(addresses[0]))).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """-> (private key, public key) of one SuperNode, both in OpenSSH format (EC P-384).

    The public key's comment is ``name``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public
