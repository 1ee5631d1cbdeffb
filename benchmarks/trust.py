"""What signing and sealing cost per message (schemas.trust / schemas.codec), in process.

    .venv/bin/python -m benchmarks.trust [--n 5000]

Prints, for a start command (Authorization header, a token in env, a certificate pair: the
secret fields sealed) and for a result (signed only): the time to encode and to decode it in
the plain local form and on the wire, and the sizes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    Keyring,
    OutpostTarget,
    PrivateKey,
    ServerRef,
    StartCommand,
    decode,
    decode_wire,
    encode,
    encode_wire,
)


def per_call(n: int, work: Callable[[], object]) -> float:
    began = time.perf_counter()
    for _ in range(n):
        work()
    return (time.perf_counter() - began) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trust", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    n = parser.parse_args().n
    hub_key, bridge_key = PrivateKey.generate("hub"), PrivateKey.generate("bridge")
    hub = Keyring.for_hub(hub_key, [bridge_key.public.text()])
    bridge = Keyring.for_bridge([bridge_key], {"hub": [hub_key.public.text()]})
    start = Envelope(
        id="m" * 32,
        hub="hub",
        server=ServerRef(user="alice", start_id="s" * 32),
        deadline=time.time() + 60,
        body=StartCommand(
            target=OutpostTarget(
                url="https://outpost.example.org/services", headers={"Authorization": "Basic " + "x" * 40}
            ),
            name="alice",
            env={"JUPYTERHUB_API_TOKEN": "t" * 32, **{f"VAR_{i}": "v" * 40 for i in range(30)}},
            certs={"certfile": "C" * 1500, "keyfile": "K" * 1700},
        ),
    )
    result = Envelope(
        id="r" * 32,
        hub="hub",
        server=start.server,
        correlation_id=start.id,
        body=CommandResult(command="start", ok=True),
    )
    print(f"{n} rounds each; microseconds per message")
    for label, message, sender, receiver in (("start", start, hub, bridge), ("result", result, bridge, hub)):
        plain, wire = encode(message), encode_wire(message, sender)
        print(
            f"{label:>6}: local encode {per_call(n, lambda: encode(message)):6.1f}  decode "  # noqa: B023
            f"{per_call(n, lambda: decode(plain)):6.1f} | wire encode "  # noqa: B023
            f"{per_call(n, lambda: encode_wire(message, sender)):6.1f}  decode "  # noqa: B023
            f"{per_call(n, lambda: decode_wire(wire, receiver)):6.1f} | {len(plain)} B -> {len(wire)} B"  # noqa: B023
        )


if __name__ == "__main__":
    main()
