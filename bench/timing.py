"""Timing, apart from scoring: warm-up, repeated timed calls, the median; CUDA timed with events."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import torch


def _sync_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int, device="cpu") -> float:
    """Median wall time of `repeats` calls after `warmup` untimed ones."""
    device = torch.device(device)
    run = _sync_timer(device)
    for _ in range(warmup):
        run(fn)
    return statistics.median(run(fn) for _ in range(repeats))


def time_phases(sample: Callable[[], object], decode: Callable[[object], object],
                extract: Callable[[object], object] | None, batch: int, warmup: int, repeats: int, device) -> dict:
    """The timing protocol: each phase timed apart (median of `repeats` after `warmup`), on the
    output of the phase before. sample() -> tokens, decode(tokens) -> images, extract(images), for
    a batch of `batch` images. -> seconds per batch of each phase, the rates they give, and the
    peak memory over all of them. img_per_s is the results schema's: sampling and decoding."""
    last: dict = {}
    reset_peak_memory(device)
    s = median_seconds(lambda: last.__setitem__("tokens", sample()), warmup, repeats, device)
    d = median_seconds(lambda: last.__setitem__("images", decode(last["tokens"])), warmup, repeats, device)
    f = median_seconds(lambda: extract(last["images"]), warmup, repeats, device) if extract is not None else None
    return {"sample_s_per_batch": s, "decode_s_per_batch": d, "features_s_per_batch": f,
            "img_per_s": batch / (s + d), "sampling_img_per_s": batch / s,
            "end_to_end_img_per_s": batch / (s + d + f) if f is not None else None,
            "end_to_end_overhead": (d + f) / s if f is not None else None,
            "batch_size": batch, "peak_mem_mb": peak_memory_mb(device)}


def reset_peak_memory(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size
    (a high-water mark since start, which cannot be reset; recorded as such in the manifest)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    """The processor's model name where Linux says it, so timings of different CPUs never compare."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
