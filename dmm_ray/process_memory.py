"""This process's peak resident memory (CPU). The memory planner (`dmm_ray.memory_plan`) counts bytes
from the architecture before anything runs; these read what a running process really holds: the
distill reporter logs it, and the packing and GPU benchmarks compare it with the plan."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory: /proc's VmHWM (Linux), which exec and `reset_peak_rss`
    reset, where getrusage's ru_maxrss keeps the high-water mark of the process that spawned this one."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement from the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
