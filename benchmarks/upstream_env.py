"""The upstream OutpostSpawner in a virtualenv of its own, for the stack comparison.

    python -m benchmarks.upstream_env        # creates or checks it, prints its bin directory

``jupyterhub-outpostspawner`` (latest 2.x) from PyPI with exactly the JupyterHub version of the
running interpreter's environment, in ``.cache/bench/upstream-venv``: never in ``.venv``, never
a dependency of this package. Rebuilt when the JupyterHub version no longer matches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jupyterhub

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".cache" / "bench" / "upstream-venv"
UPSTREAM = "jupyterhub-outpostspawner>=2,<3"
MARKER = VENV / ".bench-installed"


def installed() -> dict[str, str]:
    """What the venv holds (``{}`` when it is missing or incomplete)."""
    try:
        return dict(json.loads(MARKER.read_text()))
    except (OSError, ValueError):
        return {}


def ensure(quiet: bool = False) -> Path:
    """The venv's bin directory, created or updated first when needed."""
    if installed().get("jupyterhub") == jupyterhub.__version__:
        return VENV / "bin"
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV.relative_to(ROOT)} for the upstream OutpostSpawner", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pin = f"jupyterhub=={jupyterhub.__version__}"
    print(f"installing {UPSTREAM} with {pin}", file=sys.stderr, flush=True)
    subprocess.run([*pip, UPSTREAM, pin], check=True)
    versions = subprocess.run(
        [
            str(python),
            "-c",
            "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in"
            " ('jupyterhub', 'jupyterhub-outpostspawner', 'jupyterhub-forwardbasespawner')}))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    MARKER.write_text(versions)
    if not quiet:
        print(f"upstream venv: {versions.strip()}", file=sys.stderr)
    return VENV / "bin"


if __name__ == "__main__":
    print(ensure())
