"""TLS material of one cluster: a CA of its own and a certificate for each role, made here.

Every member authenticates every other: the scheduler, each worker and each client show a
certificate signed by the cluster's CA and accept only peers that do (Dask's TLS is mutual:
``CERT_REQUIRED`` both ways). A client with a certificate from any other CA, or none, or plain
TCP, is refused. The CA's private key never leaves this machine; the role keys are written 0600
here and sent to the targets inside the agent's framed requests (never on a command line or in
an instance's user-data).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("scheduler", "worker", "client")
VALID_DAYS = 365


@dataclass
class ClusterTLS:
    """PEM texts: the CA certificate and ``{role: (certificate, key)}``."""

    ca_cert: str
    roles: dict[str, tuple[str, str]] = field(default_factory=dict)
    ca_key: str = ""

    @classmethod
    def generate(cls, cluster_id: str) -> ClusterTLS:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)

        def pem_key(key: Any) -> str:
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"remotemagic cluster {cluster_id} CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out = cls(ca_cert.public_bytes(serialization.Encoding.PEM).decode(), ca_key=pem_key(ca_key))
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        for role in ROLES:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dask-{role}-{cluster_id}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                             data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"dask-{role}")]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(aki, critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            out.roles[role] = (cert.public_bytes(serialization.Encoding.PEM).decode(), pem_key(key))
        return out

    def target_files(self) -> dict[str, str]:
        """What the targets get (file name -> text): the CA certificate and every role's pair --
        not the CA key, so no target can sign new members."""
        out = {"ca.pem": self.ca_cert}
        for role, (cert, key) in self.roles.items():
            out[f"{role}.pem"] = cert
            out[f"{role}.key"] = key
        return out

    def write(self, folder: str | os.PathLike[str]) -> dict[str, str]:
        """Write every file (0600, atomically) into ``folder`` (0700); return their paths by name."""
        from ..agent import files

        folder = files.private_dir(str(folder))
        out = {}
        for name, text in {**self.target_files(), "ca.key": self.ca_key}.items():
            path = os.path.join(folder, name)
            files.atomic_write(path, [text.encode()])
            os.chmod(path, 0o600)
            out[name] = path
        return out

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> ClusterTLS:
        p = Path(folder)
        out = cls((p / "ca.pem").read_text(), ca_key=(p / "ca.key").read_text() if (p / "ca.key").exists() else "")
        for role in ROLES:
            if (p / f"{role}.pem").exists():
                out.roles[role] = ((p / f"{role}.pem").read_text(), (p / f"{role}.key").read_text())
        return out


def security(paths: dict[str, str], role: str = "client") -> Any:
    """A ``distributed.Security`` for ``role`` from the written files' ``paths`` (TLS required)."""
    from distributed.security import Security

    kw = {"tls_ca_file": paths["ca.pem"], f"tls_{role}_cert": paths[f"{role}.pem"],
          f"tls_{role}_key": paths[f"{role}.key"]}
    return Security(require_encryption=True, **kw)


def dask_config(paths: dict[str, str], role: str = "client") -> dict[str, Any]:
    """The same as Dask configuration (``dask.config.set``): for code on a target that calls
    ``distributed.get_client()`` without arguments."""
    return {"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": paths["ca.pem"],
            f"distributed.comm.tls.{role}.cert": paths[f"{role}.pem"],
            f"distributed.comm.tls.{role}.key": paths[f"{role}.key"]}
