"""Memory, throughput and GPU readings.

Per-step memory comes from the torch CUDA allocator (no device sync: these are host-side
counters). On the CPU there is no allocator to ask, so the step fields carry the process RSS.
A daemon thread samples the process and the GPU (torch's NVML readers) about once a second.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Callable
from typing import Any, TypedDict

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


class GpuSample(TypedDict):
    gpu_util: float | None
    gpu_mem_used_mb: float | None
    gpu_mem_total_mb: float | None
    gpu_power_w: float | None
    gpu_temp_c: float | None


class GpuReadings:
    """One GPU's utilisation, memory, power and temperature, through torch's NVML-backed readers.

    torch maps ``device`` (an index among the visible GPUs) through CUDA_VISIBLE_DEVICES to NVML's
    index, so with ``CUDA_VISIBLE_DEVICES=3`` device 0 reads GPU 3. Each reading degrades to None
    where NVML is missing or the GPU does not report it.
    """

    def __init__(self, device: int) -> None:
        self.device = device
        try:
            self.total_mb: float | None = torch.cuda.get_device_properties(device).total_memory / MB
        except Exception:  # no CUDA: nothing to read
            self.total_mb = None

    def read(self) -> GpuSample:
        cuda, d = torch.cuda, self.device
        return GpuSample(
            gpu_util=_reading(lambda: float(cuda.utilization(d))),
            gpu_mem_used_mb=_reading(lambda: cuda.device_memory_used(d) / MB),
            gpu_mem_total_mb=self.total_mb,
            gpu_power_w=_reading(lambda: cuda.power_draw(d) / 1000.0),  # NVML reports milliwatts
            gpu_temp_c=_reading(lambda: float(cuda.temperature(d))),
        )


def _reading(read: Callable[[], float]) -> float | None:
    try:
        return read()
    except Exception:  # no NVML, or a reading this GPU does not give: the others still count
        return None


class SystemSampler:
    """Calls ``emit(SystemEvent)`` about every ``interval`` seconds until stopped."""

    def __init__(self, emit: Callable[[Any], None], use_gpu: bool, interval: float = 1.0) -> None:
        self.emit = emit
        self.interval = interval
        self.proc = psutil.Process()
        self.gpu = GpuReadings(torch.cuda.current_device()) if use_gpu else None
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
        rss, cpu = self.proc.memory_info().rss / MB, self.proc.cpu_percent(None)
        if self.gpu is None:
            return SystemEvent(rss_mb=rss, cpu_percent=cpu)
        return SystemEvent(rss_mb=rss, cpu_percent=cpu, **self.gpu.read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit(self.sample())
