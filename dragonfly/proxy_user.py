"""`python -m dragonfly proxy-user FILE USER`: add or replace a user of proxy.auth_file.

The password is read from standard input (its first line) when that is not a
terminal, else asked twice without echo. The file keeps argon2 hashes only, mode 0600.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from dragonfly.peer.exposure import write_user

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _password() -> str | None:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        return None
    return first


def proxy_user_command(args: argparse.Namespace) -> int:
    password = _password()
    if password is None:
        print("dragonfly proxy-user: the passwords differ", file=sys.stderr)
        return EXIT_USAGE
    if not password:
        print("dragonfly proxy-user: an empty password is not allowed", file=sys.stderr)
        return EXIT_USAGE
    try:
        write_user(args.file, args.user, password)
    except ValueError as exc:
        print(f"dragonfly proxy-user: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"dragonfly proxy-user: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.user} can now use the proxy (set proxy.auth_file = {args.file!r})")
    return EXIT_OK
