"""Certificates and keys for a Deployment-Engine federation: TLS for the SuperLink, auth keys for SuperNodes.

    python -m deploy.certs --out certs --sites factory-a factory-b [--host superlink.example.com]

writes
    ca.crt, ca.key            a private certificate authority (give ca.crt to every site and to the CLI)
    server.crt, server.key    the SuperLink's certificate, valid for localhost, 127.0.0.1 and each --host
    supernodes/<site>         a SuperNode's private key (ECDSA P-384, OpenSSH format, as Flower reads it)
    supernodes/<site>.pub     its public key (register it with `flwr supernode register`)

Made with the `cryptography` package rather than the openssl/ssh-keygen command-line tools: Flower
itself depends on it (it loads the SuperNode keys with it), so it is present wherever a SuperLink or
a SuperNode runs, including machines without openssl. Existing files are kept, so a rerun only adds
the keys of new sites; rotation is explicit: `--renew-tls` (a new CA and server certificate),
`--renew-keys` (new key pairs for the sites named).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cl_fed.io import atomic_write_bytes

LOCAL_NAMES = ("localhost", "127.0.0.1")  # the SuperLink's own SuperExec connects to it locally


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt=serialization.PrivateFormat.PKCS8) -> None:
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as error:
        raise ValueError(f"{path}: not a readable private key ({error})") from None


def _certificate(
    subject: str, public_key, issuer: x509.Name, signer, days: int, ca: bool, hosts=()
) -> x509.Certificate:
    """A CA certificate (self-signed when `signer` is its own key), or a server certificate for
    localhost, 127.0.0.1 and `hosts`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))  # 5 min of clock skew
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:  # digital signature, certificate and CRL signing
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    else:
        names = []
        for host in dict.fromkeys([*LOCAL_NAMES, *hosts]):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA384())


def make_tls(out: Path, hosts: list[str] = (), days: int = 365, renew: bool = False) -> dict[str, Path]:
    """A CA and a SuperLink server certificate signed by it (kept if present, unless `renew`)."""
    paths = {name: out / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    if renew or not all(p.is_file() for p in paths.values()):
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cl-fed federation CA")])
        ca_cert = _certificate("cl-fed federation CA", ca_key.public_key(), ca_name, ca_key, days, ca=True)
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_cert = _certificate(
            "cl-fed superlink", server_key.public_key(), ca_name, ca_key, days, ca=False, hosts=hosts
        )
        _write_key(paths["ca.key"], ca_key)
        atomic_write_bytes(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(paths["server.key"], server_key)
        atomic_write_bytes(paths["server.crt"], server_cert.public_bytes(serialization.Encoding.PEM))
    else:
        _load_key(paths["server.key"])  # a clear error now rather than a TLS failure later
    return paths


def make_supernode_key(out: Path, site: str, renew: bool = False) -> tuple[Path, Path]:
    """`supernodes/<site>` (private, OpenSSH) and `supernodes/<site>.pub`: one key pair per SuperNode
    (kept if present, unless `renew`)."""
    private, public = out / "supernodes" / site, out / "supernodes" / f"{site}.pub"
    if renew or not (private.is_file() and public.is_file()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(private, key, serialization.PrivateFormat.OpenSSH)
        atomic_write_bytes(
            public,
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + b"\n",
        )
    return private, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("certs"), help="directory for the files (default: certs)"
    )
    parser.add_argument("--sites", nargs="*", default=[], help="one SuperNode key pair per site name")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name or IP the SuperLink is reached at (repeatable)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default: 365)")
    parser.add_argument("--renew-tls", action="store_true", help="make a new CA and server certificate")
    parser.add_argument("--renew-keys", action="store_true", help="make new key pairs for the --sites named")
    args = parser.parse_args(argv)
    tls = make_tls(args.out, args.host, args.days, args.renew_tls)
    keys = [make_supernode_key(args.out, site, args.renew_keys) for site in args.sites]
    for path in [*tls.values(), *(p for pair in keys for p in pair)]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
