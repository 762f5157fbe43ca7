"""Per-phase GPU telemetry: seconds, torch's peak allocated and reserved memory, and NVML's view
(device memory used, utilization, power) sampled by a background thread every 50 ms while a
phase runs. NVML (nvidia-ml-py) is optional: without it, or without a GPU, the torch numbers and
the seconds remain."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

try:
    import pynvml
except ImportError:  # CPU-only machines
    pynvml = None


class _Sampler(threading.Thread):
    def __init__(self, handle, interval_s: float):
        super().__init__(daemon=True, name="fastazr-nvml")
        self.handle, self.interval_s = handle, interval_s
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        # A board or MIG slice may not report utilization or power (NVML_ERROR_NOT_SUPPORTED):
        # those read as NaN, and telemetry never takes the training down.
        values = []
        for read in (lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used,
                     lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                     lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0):
            try:
                values.append(float(read(self.handle)))
            except pynvml.NVMLError:
                values.append(float("nan"))
        with self.lock:
            self.samples.append(tuple(values))

    def take(self) -> list[tuple[float, float, float]]:
        self.sample()  # at least one per phase, however short
        with self.lock:
            samples, self.samples = self.samples, []
        return samples


class Telemetry:
    def __init__(self, device: torch.device | str, interval_s: float = 0.05):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.records: list[dict[str, float | str]] = []
        self._sampler: _Sampler | None = None
        if self.cuda and pynvml is not None:
            try:
                pynvml.nvmlInit()
                # NVML numbers every GPU of the machine; CUDA only the visible ones
                index = torch.cuda._get_nvml_device_index(self.device)
                self._sampler = _Sampler(pynvml.nvmlDeviceGetHandleByIndex(index), interval_s)
                self._sampler.start()
            except (pynvml.NVMLError, RuntimeError):  # no NVML, or a CUDA_VISIBLE_DEVICES it cannot map
                self._sampler = None

    @contextmanager
    def phase(self, name: str, sync: bool = True):
        """Time a phase and record its memory and NVML samples. With `sync` (the default) the
        device work of the phase is timed too; without, only the host's part (a phase that only
        queues asynchronous copies must not wait for them)."""
        if self.cuda and sync:
            torch.cuda.synchronize(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._sampler is not None:
            self._sampler.take()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda and sync:
                torch.cuda.synchronize(self.device)
            record: dict[str, float | str] = dict(phase=name, seconds=time.perf_counter() - start)
            if self.cuda:
                record.update(peak_allocated_gib=torch.cuda.max_memory_allocated(self.device) / 2**30,
                              reserved_gib=torch.cuda.memory_reserved(self.device) / 2**30)
            if self._sampler is not None:
                samples = self._sampler.take()
                record.update(nvml_used_gib=max(s[0] for s in samples) / 2**30,
                              gpu_util_pct=sum(s[1] for s in samples) / len(samples),
                              power_w=sum(s[2] for s in samples) / len(samples),
                              power_max_w=max(s[2] for s in samples))
            self.records.append(record)

    def timeline(self) -> dict[str, float]:
        """The phases recorded since the last call as flat metrics ('<phase>/seconds', ...); a
        phase met twice is summed (seconds) or maxed (the rest)."""
        metrics: dict[str, float] = {}
        for record in self.records:
            name = record["phase"]
            for key, value in record.items():
                if key == "phase":
                    continue
                full = f"{name}/{key}"
                if key == "seconds":
                    metrics[full] = metrics.get(full, 0.0) + value
                else:
                    metrics[full] = max(metrics.get(full, value), value)
        self.records = []
        return metrics

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stopped.set()
            self._sampler.join()
            self._sampler = None
