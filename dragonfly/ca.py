"""`python -m dragonfly ca init DIR`: the CA that signs certificates for hijacked hosts."""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from dragonfly.net.tls import TLSError, make_ca

EXIT_OK = 0
EXIT_FAILED = 1


def ca_command(args: argparse.Namespace) -> int:
    if args.ca_command != "init":  # argparse allows only known actions; kept for clarity
        print(f"dragonfly: unknown ca action {args.ca_command!r}", file=sys.stderr)
        return 2
    directory = Path(args.dir).absolute()
    try:
        ca = make_ca(
            directory, name=args.name, days=args.days, force=args.force, permit=args.permit
        )
    except FileExistsError as exc:
        print(f"dragonfly: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (TLSError, OSError) as exc:
        print(f"dragonfly: cannot make the CA: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(instructions(ca.cert, ca.key, args.permit))
    return EXIT_OK


def instructions(cert: Path, key: Path, permit: Sequence[str] = ()) -> str:
    """What to configure on the peer and how clients come to trust the CA."""
    bundle = cert.parent / "bundle.pem"
    q = shlex.quote
    examples = [name for name in permit if not _is_network(name)] or [
        "huggingface.co",
        "files.pythonhosted.org",
    ]
    hosts = ", ".join(f"'^{re.escape(name)}:443$'" for name in examples)
    if permit:
        scope = f"It may vouch for these names only (and their subdomains): {', '.join(permit)}."
    else:
        scope = (
            "It has no name constraints: clients that trust it accept it for any site.\n"
            "Prefer `ca init DIR --permit DOMAIN ...` naming the hosts you intercept."
        )
    return f"""\
Wrote {cert} (the CA certificate: give it to clients)
  and {key} (its private key, mode 0600: only the peer daemon should read it).
{scope}

1. Peer configuration (conf/peer.toml): intercept CONNECT to these hosts and let
   https URLs go through P2P:

    [proxy.hijack_https]
    ca_cert = {json.dumps(str(cert))}
    ca_key = {json.dumps(str(key))}
    hosts = [{hosts}]  # regexes of HOST:PORT

    [[proxy.rules]]  # (rules replace the default list, whose one rule is '^http://')
    regex = '^https?://'

   or on the command line:
    --set proxy.hijack_https.ca_cert={q(str(cert))} \\
    --set proxy.hijack_https.ca_key={q(str(key))} \\
    --set 'proxy.hijack_https.hosts=["^huggingface\\\\.co:443$"]'

   An origin whose certificate comes from a private CA: set download.origin_ca_file
   to that CA's PEM file (the system's CAs stay trusted).

2. Trust the CA on every client host (CONNECT to other hosts stays a blind tunnel,
   so clients must keep trusting the usual CAs too):

   system-wide (Debian, Ubuntu; curl, wget, pip >= 24.2 use it):
    sudo cp {q(str(cert))} /usr/local/share/ca-certificates/dragonfly-proxy-ca.crt
    sudo update-ca-certificates

   curl, for one command:
    https_proxy=http://127.0.0.1:PROXY_PORT curl --cacert {q(str(cert))} https://HOST/FILE

   pip, huggingface_hub (requests and httpx read these; point them at a bundle
   holding the system's CAs and this one):
    cat /etc/ssl/certs/ca-certificates.crt {q(str(cert))} > {q(str(bundle))}
    export https_proxy=http://127.0.0.1:PROXY_PORT
    export REQUESTS_CA_BUNDLE={q(str(bundle))} SSL_CERT_FILE={q(str(bundle))}
   (after update-ca-certificates, /etc/ssl/certs/ca-certificates.crt already holds it;
   a REQUESTS_CA_BUNDLE set without our CA overrides pip's --cert and PIP_CERT)
"""


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True
