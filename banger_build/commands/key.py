"""``banger-build key generate NAME -o FILE``: make an Ed25519 signing key pair.

FILE gets the secret key (mode 0600, created exclusively: an existing file is
never overwritten) and FILE.pub the public key, both in Nix's format
(``NAME:BASE64``). The public key is printed; the secret key never is. Give
FILE to ``push --sign-key`` and the public key to ``--trusted-key`` (or
``BANGER_BUILD_TRUSTED_KEYS``) wherever signatures are checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "key"
HELP = "make a signing key pair (Nix's NAME:BASE64 format)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    gen = sub.add_parser(
        "generate", help="write a new secret key to FILE and its public key to FILE.pub"
    )
    gen.add_argument("name", help="the key's name, e.g. ci.example.org-1 (the signatures' keyid)")
    gen.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                     help="where to write the secret key (FILE.pub: the public key)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from banger_build.errors import host_error
    from banger_build.signing.keys import SecretKey, check_name, write_key_pair

    key = SecretKey.generate(check_name(args.name))
    try:
        pub = write_key_pair(key, args.output)
    except OSError as exc:
        raise host_error("key generate", exc) from exc
    print(key.public, flush=True)  # stdout: only the public key, for scripts
    print(
        f"banger-build: wrote the secret key to {args.output} and the public key to {pub}",
        file=sys.stderr,
    )
    return 0
