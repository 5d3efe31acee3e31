"""Memory, throughput and GPU readings.

Per-step memory comes from the torch CUDA allocator (no device sync: these are host-side
counters). On the CPU there is no allocator to ask, so the step fields carry the process RSS.
A daemon thread samples the process and, through NVML, the GPU about once a second.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Callable
from typing import Any

import psutil
import torch
from tunedeck.engine.protocol import SystemEvent

MB = 1024 * 1024


def step_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "mem_allocated_mb": torch.cuda.memory_allocated(device) / MB,
            "mem_reserved_mb": torch.cuda.memory_reserved(device) / MB,
            "mem_peak_mb": torch.cuda.max_memory_allocated(device) / MB,
        }
    rss = psutil.Process().memory_info().rss / MB
    # ru_maxrss is kB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MB if sys.platform == "darwin" else 1024)
    return {"mem_allocated_mb": rss, "mem_reserved_mb": rss, "mem_peak_mb": max(peak, rss)}


class Nvml:
    """NVML readings for one GPU; every method degrades to None where NVML is missing."""

    def __init__(self, index: int = 0) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no driver, no GPU, no library: readings are simply absent
            self.handle = None

    @property
    def ok(self) -> bool:
        return self.handle is not None

    def read(self) -> dict[str, float | None]:
        if not self.ok:
            return {}
        nv, h = self.nv, self.handle
        out: dict[str, float | None] = {}
        for key, fn in (
            ("gpu_util", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
            ("gpu_mem_used_mb", lambda: nv.nvmlDeviceGetMemoryInfo(h).used / MB),
            ("gpu_mem_total_mb", lambda: nv.nvmlDeviceGetMemoryInfo(h).total / MB),
            ("gpu_power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ("gpu_temp_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
        ):
            try:
                out[key] = fn()
            except Exception:  # one unsupported reading must not hide the others
                out[key] = None
        return out


class SystemSampler:
    """Calls ``emit(SystemEvent)`` about every ``interval`` seconds until stopped."""

    def __init__(self, emit: Callable[[Any], None], use_gpu: bool, interval: float = 1.0) -> None:
        self.emit = emit
        self.interval = interval
        self.proc = psutil.Process()
        self.nvml = Nvml(torch.cuda.current_device() if use_gpu else 0) if use_gpu else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunedeck-monitor", daemon=True)

    def start(self) -> None:
        self.proc.cpu_percent(None)  # the first call only primes the counter
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def sample(self) -> SystemEvent:
        gpu = self.nvml.read() if self.nvml is not None else {}
        return SystemEvent(
            rss_mb=self.proc.memory_info().rss / MB, cpu_percent=self.proc.cpu_percent(None), **gpu
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit(self.sample())
