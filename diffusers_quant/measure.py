"""Peak memory of a block of code: host anonymous RSS (sampled) and CUDA allocator peaks.

Host memory is read as ``RssAnon`` from /proc (Linux): the private, anonymous pages, i.e. real copies of
tensors.  Memory-mapped checkpoint pages are file-backed and reclaimable, so they are not counted; a
loader that copies a file into RAM shows up, one that maps it does not.  Where /proc is missing, the
process's whole RSS (psutil) is used instead.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


def host_anon_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


@dataclass
class MemoryPeak:
    host_start: int = 0
    host_peak: int = 0
    host_end: int = 0
    cuda_start: int = 0
    cuda_peak: int = 0
    cuda_end: int = 0
    seconds: float = 0.0

    @property
    def host_growth(self) -> int:
        """Largest host growth above the starting point during the block."""
        return self.host_peak - self.host_start

    @property
    def cuda_growth(self) -> int:
        return self.cuda_peak - self.cuda_start


class track_memory:
    """``with track_memory() as peak: ...`` samples host memory every ``interval`` seconds in a thread
    (tensor work releases the GIL, so the sampler runs during long copies) and reads CUDA's exact peak."""

    def __init__(self, interval: float = 0.001, cuda: bool | None = None):
        self.interval = interval
        self.cuda = cuda
        self.result = MemoryPeak()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.result.host_peak = max(self.result.host_peak, host_anon_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> MemoryPeak:
        import torch

        if self.cuda is None:
            self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.result.cuda_start = torch.cuda.memory_allocated()
        self.result.host_start = self.result.host_peak = host_anon_bytes()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.result

    def __exit__(self, *exc) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.result.seconds = time.perf_counter() - self._start
        self.result.host_end = host_anon_bytes()
        self.result.host_peak = max(self.result.host_peak, self.result.host_end)
        if self.cuda:
            torch.cuda.synchronize()
            self.result.cuda_peak = torch.cuda.max_memory_allocated()
            self.result.cuda_end = torch.cuda.memory_allocated()
