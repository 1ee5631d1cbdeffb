"""``outpost-mq-keys``: make the signing (and, for the bridges, sealing) keys and show public keys.

    outpost-mq-keys hub --out /etc/jupyterhub/outpost-mq-hub.key      # one per hub
    outpost-mq-keys bridge --out /etc/outpost-bridge/bridge.key       # one for all bridges
    outpost-mq-keys public /etc/outpost-bridge/bridge.key             # print a key's public part

The private key goes to a new file of mode 0600 (an existing file is never overwritten); the
public key is printed, for the other side's configuration (``OutpostBridge.hub_public_keys``,
``OutpostSpawner.bridge_public_keys``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jupyterhub_outpost_mq.schemas.trust import KeyError_, PrivateKey


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outpost-mq-keys", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for role in ("hub", "bridge"):
        make = sub.add_parser(role, help=f"make a {role} key")
        make.add_argument("--out", required=True, help="the new private key file (mode 0600)")
    show = sub.add_parser("public", help="print the public key of a private key file")
    show.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.what == "public":
            print(PrivateKey.load(args.file).public.text())
            return 0
        key = PrivateKey.generate(args.what)
        key.write(args.out)
    except FileExistsError:
        print(f"outpost-mq-keys: {args.out} exists; not overwriting a key", file=sys.stderr)
        return 1
    except (OSError, KeyError_) as exc:
        print(f"outpost-mq-keys: {exc}", file=sys.stderr)
        return 1
    print(key.public.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
