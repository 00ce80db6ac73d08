"""Where a benchmark's numbers come from: the commit, the package versions and the machine.

Every benchmark stores ``provenance()`` in its JSON and ``provenance_line()`` in its Markdown,
so a result can be traced to the code and versions that produced it; ``write_results`` writes both.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rankshrink", "torch", "numpy", "tensorly", "onnx", "onnxruntime", "scikit-learn", "safetensors")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # The results folder is left out: benchmarks rewrite their own results as they go (after each model), which
    # made every run after the first model say "with uncommitted changes" of its own output.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "versions": versions, "python": platform.python_version(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def provenance_line(data: dict) -> str:
    v = data["versions"]
    commit = (data["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if data.get("dirty") else "")
    return (f"Commit `{commit}`; rankshrink {v.get('rankshrink')}, torch {v.get('torch')}, "
            f"onnxruntime {v.get('onnxruntime')}; {data['cpu']}, {data['cores']} cores (shared); {data['date']}.")


def write_results(out: str | Path, stem: str, data: dict, markdown) -> None:
    """``OUT/STEM.json`` (``data``) and ``OUT/STEM.md`` (``markdown(data)``), each written atomically; the
    Markdown is printed too."""
    sys.path.insert(0, str(ROOT / "src"))
    from rankshrink.files import atomic_write_json, atomic_write_text

    out = Path(out)
    atomic_write_json(out / f"{stem}.json", data)
    text = markdown(data)
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
