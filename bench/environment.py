"""What a result was measured on: device, versions, commit, and the GPU's nominal peak numbers.

Peak numbers are NVIDIA's datasheet values for dense math (no 2:4 sparsity), per device model; they are
nominal: real clocks under load (power and thermal limits) deliver less. Matrix peaks by dtype: bf16/fp16 on
tensor cores; fp32 is the TF32 tensor-core peak when torch allows TF32 for matmuls, else the CUDA-core FP32 peak.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    memory_bandwidth_bytes_per_s: float
    bf16_flops: float
    fp16_flops: float
    tf32_flops: float
    fp32_flops: float

    def matmul_flops(self, dtype: torch.dtype, tf32_allowed: bool) -> float:
        if dtype == torch.bfloat16:
            return self.bf16_flops
        if dtype == torch.float16:
            return self.fp16_flops
        return self.tf32_flops if tf32_allowed else self.fp32_flops


# Matched in order against torch.cuda.get_device_name() (first substring that occurs wins).
NOMINAL_PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    ("H100 PCIe", DevicePeaks(2.0e12, 756e12, 756e12, 378e12, 51e12)),
    ("H100 NVL", DevicePeaks(3.9e12, 835e12, 835e12, 418e12, 60e12)),
    ("H200", DevicePeaks(4.8e12, 989e12, 989e12, 494e12, 67e12)),
    ("H100", DevicePeaks(3.35e12, 989e12, 989e12, 494e12, 67e12)),  # SXM5 ("NVIDIA H100 80GB HBM3")
)


def nominal_peaks(device_name: str) -> DevicePeaks | None:
    for key, peaks in NOMINAL_PEAKS:
        if key in device_name:
            return peaks
    return None


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("rank1_kernels", "csrc", "bench")
CODE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h")


def code_digest(root: Path = REPO) -> str:
    """A digest of the sources whose behaviour a measurement depends on (the package, its CUDA sources and the
    harness): rows of one commit measured from trees with different uncommitted edits differ here. It needs no
    git, so it also holds on a copy of the work tree without .git."""
    digest = hashlib.sha256()
    for directory in CODE_DIRS:
        for path in sorted((root / directory).rglob("*")):
            if path.suffix in CODE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()})"


def device_slug(device: torch.device) -> str:
    """A folder name for results of this device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    """Everything needed to reproduce or judge a run, for the JSON file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain")
    commit = _git("rev-parse", "HEAD")
    if commit is None and os.environ.get("RANK1_COMMIT"):
        # A copy of the work tree without .git (e.g. on a lent GPU machine): the caller names the commit, and
        # RANK1_TREE_DIRTY=1/0 whether the copy had uncommitted changes (unknown when unset).
        commit = os.environ["RANK1_COMMIT"]
        dirty = os.environ.get("RANK1_TREE_DIRTY")
        status = None if dirty not in ("0", "1") else ("dirty" if dirty == "1" else "")
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "tree_dirty": None if status is None else bool(status),
        "code_digest": code_digest(),
        # The baselines' own code: peft's LoRA forward changed between releases; open_clip builds the step's model.
        "peft": _version("peft"),
        "open_clip": _version("open_clip_torch"),
        "torch_threads": torch.get_num_threads(),
        # Other processes competing for the CPU at the start (1, 5, 15 min); high values mean noisy CPU timings.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "tf32_matmul_allowed": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            gpu_sm_count=properties.multi_processor_count,
            gpu_l2_cache_mib=round(getattr(properties, "L2_cache_size", 0) / 2**20, 1),
        )
        peaks = nominal_peaks(info["device"])
        info["nominal_peaks"] = dataclasses.asdict(peaks) if peaks else None
    return info
