"""Where the hub's CPU goes: py-spy samples the hub process during a scenario's measured part
(``compare_upstream --profile``), and the samples are summed by who owns the code.

py-spy reads the hub's memory from outside (no instrumentation, the hub runs as measured;
``--nonblocking``, so it is not paused either) and records only threads that are running, so
the samples stand for CPU time. Each sample's stack is put into one bucket by the innermost
frame that belongs to a known owner (our package, upstream's OutpostSpawner, the floor's
spawner, JupyterHub, tornado, SQLAlchemy, ...), and for each owner the share of samples with
a frame of it anywhere on the stack ("inclusive") is reported too: the inclusive share of our
package is the most our spawner can cost the hub, everything under it included.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / part) + "/" for part in ("spawner", "schemas", "bridge", "jupyterhub_outpost_mq"))
# (owner, path fragment) in the order they are tried; the first that matches a frame's file wins.
OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ours", OURS),
    ("upstream spawner", ("/outpostspawner/", "/jupyterhub_forwardbasespawner/", "/forwardbasespawner/")),
    ("floor spawner", (str(ROOT / "benchmarks") + "/",)),
    ("jupyterhub", ("/jupyterhub/",)),
    ("tornado", ("/tornado/",)),
    ("sqlalchemy", ("/sqlalchemy/",)),
    ("amqp (aio-pika, aiormq, pamqp)", ("/aio_pika/", "/aiormq/", "/pamqp/")),
    ("crypto and codecs (cryptography, msgspec)", ("/cryptography/", "/msgspec/")),
    ("traitlets", ("/traitlets/",)),
    ("jinja2", ("/jinja2/",)),
    ("logging", ("/logging/",)),
    ("asyncio", ("/asyncio/",)),
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def owner_of(path: str) -> str | None:
    for owner, fragments in OWNERS:
        if any(fragment in path for fragment in fragments):
            return owner
    return None


class Sampler:
    """``py-spy record`` attached to ``pid`` from :meth:`start` until :meth:`stop`."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        self.pid, self.output, self.rate = pid, output, rate
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sampler:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw"]
        argv += ["--full-filenames", "--nonblocking", "--output", str(self.output)]
        log = self.output.with_suffix(".log").open("wb")
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def summarize(raw: Path, top: int = 12) -> dict[str, object]:
    """Samples per owner (by the innermost owned frame, and inclusive), and our package's
    functions with the most samples under them."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    ours_functions: Counter[str] = Counter()
    hub_functions: Counter[str] = Counter()  # the innermost JupyterHub frame of each sample
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else ():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [FRAME.match(f) for f in stack.split(";")]  # outermost first
        owners = [owner_of(m.group("file")) if m else None for m in frames]
        leaf[next((o for o in reversed(owners) if o), "other")] += count
        for owner in set(o for o in owners if o):
            inclusive[owner] += count
        in_hub = [m for m, owner in zip(frames, owners, strict=True) if m and owner == "jupyterhub"]
        if in_hub:
            m = in_hub[-1]
            hub_functions[f"{m.group('func')} (jupyterhub/{m.group('file').rpartition('/jupyterhub/')[2]})"] += count
        seen: set[str] = set()
        for m, owner in zip(frames, owners, strict=True):
            if m and owner == "ours":
                name = f"{m.group('func')} ({Path(m.group('file')).relative_to(ROOT)})"
                if name not in seen:
                    seen.add(name)
                    ours_functions[name] += count
    share = {k: round(v / total, 3) for k, v in leaf.most_common()} if total else {}
    return {
        "samples": total,
        "by_innermost_owner": share,
        "inclusive": {k: round(v / total, 3) for k, v in inclusive.most_common()} if total else {},
        "ours_top": [(name, round(n / total, 3)) for name, n in ours_functions.most_common(top)] if total else [],
        "jupyterhub_top": [(name, round(n / total, 3)) for name, n in hub_functions.most_common(top)] if total else [],
    }


def report(label: str, summary: dict[str, object]) -> str:
    """A few lines for the console."""
    lines = [f"    profile {label}: {summary['samples']} samples"]
    by_leaf = summary["by_innermost_owner"]
    assert isinstance(by_leaf, dict)
    lines.append("      innermost owner: " + ", ".join(f"{k} {v:.0%}" for k, v in by_leaf.items()))
    inclusive = summary["inclusive"]
    assert isinstance(inclusive, dict)
    lines.append("      anywhere on the stack: " + ", ".join(f"{k} {v:.0%}" for k, v in inclusive.items()))
    for key, title in (("jupyterhub_top", "innermost JupyterHub function"), ("ours_top", "our functions")):
        top = summary[key]
        assert isinstance(top, list)
        if top:
            lines.append(f"      {title}:")
        lines += [f"      {part:6.1%}  {name}" for name, part in top[:8]]
    return "\n".join(lines)


if __name__ == "__main__":  # summarize raw files given on the command line
    for path in sys.argv[1:]:
        summary = summarize(Path(path))
        print(report(path, summary))
        print(json.dumps(summary, indent=1))
