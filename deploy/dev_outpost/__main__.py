"""Run the development Outpost from the command line until SIGTERM or SIGINT.

Usage::

    python -m jupyterhub_outpost_mq.deploy.dev_outpost --port 8082 --bind 127.0.0.1 \\
        --credentials hubuser:secret [--credentials other:pw] [--log-level INFO]

Credentials may also come from ``DEV_OUTPOST_CREDENTIALS="u1:p1,u2:p2"`` (command-line
entries win for the same user). ``--port 0`` picks a free port. Once listening, one line
``dev-outpost listening on http://HOST:PORT`` is printed to stdout; logs go to stderr.
On SIGTERM/SIGINT the Outpost stops accepting requests, stops every singleuser process
it started and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from jupyterhub.utils import fmt_ip_url

from jupyterhub_outpost_mq.deploy.dev_outpost.app import create_app
from jupyterhub_outpost_mq.deploy.dev_outpost.services import ServiceRegistry

CREDENTIALS_ENV = "DEV_OUTPOST_CREDENTIALS"


def parse_credentials(cli_values: list[str], env_value: str | None) -> dict[str, str]:
    """Merge ``user:password`` entries from the environment and the command line."""
    entries = [e for e in (env_value or "").split(",") if e.strip()] + cli_values
    credentials: dict[str, str] = {}
    for entry in entries:
        user, sep, password = entry.strip().partition(":")
        if not user or not sep or not password:
            raise ValueError("credentials must look like user:password")
        credentials[user] = password
    return credentials


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jupyterhub_outpost_mq.deploy.dev_outpost",
        description="Development JupyterHub Outpost running local jupyterhub-singleuser servers.",
    )
    parser.add_argument("--port", type=int, default=8082, help="TCP port (0: any free port)")
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address for the Outpost and for every singleuser server it starts",
    )
    parser.add_argument(
        "--credentials",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help=f"Basic auth credentials of one hub (repeatable; also ${CREDENTIALS_ENV})",
    )
    parser.add_argument(
        "--home-root",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dev-outpost-homes",
        help="parent directory of the per-user HOME directories",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the servers' log files go (kept); default: a temporary folder removed on exit",
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level name")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, credentials: dict[str, str]) -> None:
    # Log files of the services: kept in --state-dir, else removed again when the Outpost exits.
    temporary = args.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="dev-outpost-state-")) if temporary else args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = ServiceRegistry(
        bind_ip=args.bind, state_dir=state_dir, home_root=args.home_root, keep_logs=not temporary
    )
    runner = web.AppRunner(create_app(credentials, registry), handle_signals=False)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.bind, args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"dev-outpost listening on http://{fmt_ip_url(args.bind)}:{port}", flush=True)
        await stop_requested.wait()
        logging.getLogger("dev_outpost").info("signal received, shutting down")
    finally:
        # Stops the listening site first, then runs on_shutdown (which stops every service).
        await runner.cleanup()
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        credentials = parse_credentials(args.credentials, os.environ.get(CREDENTIALS_ENV))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not credentials:
        print(f"error: give --credentials or ${CREDENTIALS_ENV}", file=sys.stderr)
        return 2
    asyncio.run(serve(args, credentials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
