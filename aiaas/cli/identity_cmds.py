"""`aiaas identity`: development identities (signing keys, tokens, certificates) for services and tools.

    aiaas identity keygen DIR                 Ed25519 signing key pair (signing.key 0600, signing.pub)
    aiaas identity token NAME --key FILE      a token for identity NAME, printed or written (--out)
    aiaas identity certs DIR NAME [NAME ...]  a development CA and a certificate per identity

Services verify tokens with `--identity-token-key signing.pub` and present their own with
`--identity-token-file`; certificates go to `--tls-cert`/`--tls-key`/`--tls-client-ca` and
`--client-tls-*`. Production certificates come from your PKI or cert-manager (docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def cmd_keygen(args: argparse.Namespace) -> int:
    from aiaas.identity import generate_signing_key

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / "signing.key", directory / "signing.pub"
    if private.exists() and not args.force:
        print(f"{private} exists; pass --force to replace it (tokens it signed stop verifying)", file=sys.stderr)
        return 2
    private_pem, public_pem = generate_signing_key()
    _write_private(private, private_pem)
    public.write_bytes(public_pem)
    print(f"wrote {private} (keep it with the operator) and {public} (give it to every service)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from aiaas.identity import mint_token

    try:
        token = mint_token(Path(args.key).read_bytes(), args.name, ttl_s=args.ttl_days * 86400.0)
    except (OSError, ValueError) as exc:
        print(f"cannot mint a token: {exc}", file=sys.stderr)
        return 2
    if args.out:
        _write_private(Path(args.out), token.encode())
        print(f"wrote {args.out} (identity {args.name}, valid {args.ttl_days:g} days)")
    else:
        print(token)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from aiaas import pki

    directory = Path(args.dir)
    ca_cert = directory / "ca.crt"
    if ca_cert.exists():
        from aiaas.pki import Issued

        ca = Issued(ca_cert.read_bytes(), (directory / "ca.key").read_bytes())
    else:
        ca = pki.make_ca()
        pki.write(ca, directory, "ca")
    for name in args.names:
        issued = pki.issue(ca, name, dns_names=[name, "localhost", *args.dns], namespace=args.namespace,
                           trust_domain=args.trust_domain)
        cert, key = pki.write(issued, directory, name)
        print(f"{name}: {cert} {key} (spiffe://{args.trust_domain}/{args.namespace}/{name})")
    print(f"CA: {ca_cert}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("identity", help="development identities: signing keys, tokens, certificates",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="identity_command", metavar="SUBCOMMAND", required=True)
    keygen = sub.add_parser("keygen", help="an Ed25519 signing key pair for development tokens")
    keygen.add_argument("dir")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=cmd_keygen)
    token = sub.add_parser("token", help="mint a development token for an identity")
    token.add_argument("name", help="identity: registry, inference, gateway, monitor, deployer, admin")
    token.add_argument("--key", required=True, help="the private signing key (signing.key)")
    token.add_argument("--ttl-days", type=float, default=30.0)
    token.add_argument("--out", help="write it to this file (mode 0600) instead of printing it")
    token.set_defaults(func=cmd_token)
    certs = sub.add_parser("certs", help="a development CA and one certificate per identity (mTLS)")
    certs.add_argument("dir")
    certs.add_argument("names", nargs="+")
    certs.add_argument("--namespace", default="default")
    certs.add_argument("--trust-domain", default="aiaas")
    certs.add_argument("--dns", action="append", default=[], help="extra DNS name for every certificate")
    certs.set_defaults(func=cmd_certs)
