"""A snapshot of the machine and software a run used (host, OS, CPU/GPU, CUDA, packages)."""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess

PACKAGES = (
    "mlproject", "torch", "transformers", "datasets", "accelerate", "lm_eval", "peft", "trl",
    "bitsandbytes", "mlflow", "optuna", "pandas", "safetensors", "tokenizers", "numpy", "scipy",
    "gguf",
)


@functools.cache  # installed versions do not change under a running process; a search logs them per trial
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def collect() -> dict:
    """Flat dict of environment facts; values are strings or numbers (None when unknown)."""
    import psutil
    import torch

    info: dict = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_count": 0,
        "gpu_memory_gb": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), driver=_nvidia_driver())
    for pkg in PACKAGES:
        info[f"pkg.{pkg}"] = _version(pkg)
    return info
