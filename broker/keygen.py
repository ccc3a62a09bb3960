"""``zchat-keygen``: make CURVE key pairs for brokers and clients.

Each NAME gets ``NAME.key`` (public: give it to the other side) and
``NAME.key_secret`` (keep it; mode 0600), in zmq.auth's certificate format.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import zmq.auth

from zchat.keys import make_keypair

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zchat-keygen",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog="A typical setup: `zchat-keygen --dir keys broker alice bob`, then give "
               "keys/broker.key to every client, put alice.key and bob.key in a directory "
               "for the broker's --authorized-keys, and give each client its .key_secret.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name")
    p.add_argument("--dir", default=".", help="where to write the files (default: .)")
    args = p.parse_args(argv)
    for name in args.names:
        if not name or "/" in name or name.startswith("."):
            print(f"zchat-keygen: bad name {name!r}", file=sys.stderr)
            return 2
        try:
            public, secret = make_keypair(args.dir, name)
        except OSError as exc:
            print(f"zchat-keygen: {exc}", file=sys.stderr)
            return 1
        key, _ = zmq.auth.load_certificate(public)
        print(f"{public}  {secret}  public key {key.decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
