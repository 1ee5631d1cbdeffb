"""The release check: build the sdist and the wheel, check them, and install the wheel into a
fresh virtualenv per extra, as an admin would.

- The wheel holds exactly one top-level name, ``jupyterhub_outpost_mq``, and none of the
  development tools (dev Outpost, stack launcher, reference generator); the sdist holds them.
- ``[hub]`` beside the PyPI distributions that own the generic names ``schemas``, ``spawner``
  and ``deploy``: nothing of ours is shadowed or overwritten, no SSH or Kubernetes client is
  installed, and JupyterHub's own spawner lookup loads ``outpost-mq``.
- ``[bridge]``: no JupyterHub installed; ``outpost-bridge --help-all`` answers (its time is
  printed) and the bridge serves until SIGTERM against the test broker.

Everything runs in a temporary folder outside the checkout, so the repository's top-level
folders cannot be imported by accident.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.services import AMQP_URL, port_open

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "jupyterhub_outpost_mq"
# PyPI distributions that install top-level packages with the names our parts have in the repository.
NAME_SQUATTERS = ("schemas", "spawner", "deploy")

pytestmark = pytest.mark.release


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("release")


@pytest.fixture(scope="module")
def dist(outside: Path) -> Dist:
    out = outside / "dist"
    # python -m build makes the sdist, then the wheel from the unpacked sdist: a file the sdist
    # lacks breaks the wheel, so both are checked at once.
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=outside)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dist(sdist, wheel)


def fresh_venv(where: Path, *requirements: str) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    python = where / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements, cwd=where.parent)
    return python


def clean_env() -> dict[str, str]:
    """The environment without this test run's virtualenv on PATH or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


def test_twine_check(dist: Dist, outside: Path) -> None:
    run(sys.executable, "-m", "twine", "check", "--strict", dist.sdist, dist.wheel, cwd=outside)


def test_wheel_holds_one_import_name_and_no_dev_tools(dist: Dist) -> None:
    names = zipfile.ZipFile(dist.wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {PACKAGE}, top
    parts = {n.split("/")[1] for n in names if n.startswith(f"{PACKAGE}/") and n.count("/") > 1}
    assert parts == {"schemas", "spawner", "bridge"}, parts
    assert not [n for n in names if "/deploy/" in n or "dev_outpost" in n or "configdoc" in n]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(dist.wheel).read(entry_points).decode()
    assert f"outpost-mq = {PACKAGE}.spawner:OutpostSpawner" in text
    assert f"outpost-bridge = {PACKAGE}.bridge.app:main" in text


def test_sdist_carries_the_dev_tools_and_tests(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("deploy/stack.py", "deploy/dev_outpost/app.py", "deploy/configdoc.py", "tests/conftest.py", "dev"):
        assert needed in names, needed


def test_hub_extra_installs_beside_generic_names(dist: Dist, outside: Path) -> None:
    where = outside / "venv-hub"
    python = fresh_venv(where, "--no-deps", *NAME_SQUATTERS)
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{dist.wheel}[hub]", cwd=outside)
    probe = """
import importlib.util, json, sys
from jupyterhub.app import JupyterHub
cls = JupyterHub(spawner_class="outpost-mq").spawner_class  # JupyterHub's own entry-point lookup
print(json.dumps({
    "spawner_class": f"{cls.__module__}.{cls.__qualname__}",
    # Found, not imported: PyPI's schemas is Python 2 code.
    "squatters": [importlib.util.find_spec(n).origin for n in ("schemas", "spawner", "deploy")],
    "installed": [n for n in ("asyncssh", "kubernetes_asyncio") if importlib.util.find_spec(n)],
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"asyncssh", "kubernetes_asyncio"}),
}))
"""
    found = json.loads(run(python, "-c", probe, cwd=outside, env=clean_env()))
    assert found["spawner_class"] == f"{PACKAGE}.spawner.spawner.OutpostSpawner", found
    assert all(f"site-packages/{n}/" in f for n, f in zip(NAME_SQUATTERS, found["squatters"], strict=True)), found
    assert found["installed"] == [] and found["loaded"] == [], found
    requires = run(python, "-m", "pip", "show", "jupyterhub-outpost-mq", cwd=outside)
    assert "asyncssh" not in requires and "kubernetes" not in requires, requires


def test_bridge_extra_needs_no_jupyterhub(dist: Dist, outside: Path) -> None:
    where = outside / "venv-bridge"
    python = fresh_venv(where, f"{dist.wheel}[bridge]")
    probe = """
import importlib.util, json, sys
import jupyterhub_outpost_mq.bridge.app
print(json.dumps({
    "jupyterhub_installed": importlib.util.find_spec("jupyterhub") is not None,
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"jupyterhub", "tornado", "kubernetes_asyncio"}),
}))
"""
    found = json.loads(run(python, "-c", probe, cwd=outside, env=clean_env()))
    assert found == {"jupyterhub_installed": False, "loaded": []}, found

    bridge = where / "bin" / "outpost-bridge"
    began = time.monotonic()
    text = run(bridge, "--help-all", cwd=outside, env=clean_env())
    print(f"outpost-bridge --help-all in a fresh [bridge] venv: {time.monotonic() - began:.2f} s")
    assert "--OutpostBridge.amqp_url" in text
    run(where / "bin" / "outpost-mq-replay", "--help", cwd=outside, env=clean_env())
    run(where / "bin" / "outpost-mq-dlq", "--help", cwd=outside, env=clean_env())

    assert port_open(5672), f"RabbitMQ is not listening at {AMQP_URL}: run the tests with ./dev test"
    serve_until_ready(bridge, outside)


def serve_until_ready(bridge: Path, outside: Path) -> None:
    env = clean_env() | {"AMQP_URL": AMQP_URL}
    state = outside / "bridge-state"
    state.mkdir()
    args = [str(bridge), f"--journal={state / 'journal.sqlite'}", "--name-prefix=release-check"]
    proc = subprocess.Popen(args, cwd=state, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "outpost-bridge ready" in line:
                break
        assert any("outpost-bridge ready" in x for x in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
