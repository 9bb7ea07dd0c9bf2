"""Measurements of one generate call: tokens, time split, padding, peak memory."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class GenerationMetrics:
    n_prompts: int = 0
    n_rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    # Decode attention runs over the longest row of the step; shorter rows' keys are padding.
    real_tokens: int = 0
    padded_tokens: int = 0
    peak_memory_bytes: int = 0
    kv_cache_bytes: int = 0
    batch_slots: int = 0
    # Shared prefixes (engine/kv_cache.py): prompt tokens whose K/V were read from a segment
    # instead of computed, prompt tokens computed, K/V bytes stored per running row at the
    # fullest decode step (segments counted once), segments evicted for room.
    prefix_hit_tokens: int = 0
    prefill_tokens: int = 0
    kv_bytes_per_row: int = 0
    prefix_evictions: int = 0
    guide_s: float = 0.0              # structured output: computing and applying grammar masks
    latencies_s: list[float] = field(default_factory=list)    # per prompt, from call start
    ttft_s: list[float] = field(default_factory=list)         # per prompt, first token

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def padding_waste(self) -> float:
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    def summary(self) -> dict[str, float]:
        """Flat numbers, ready for MLflow."""
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, list)}
        d.update(tokens_per_s=self.tokens_per_s, prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s, padding_waste=self.padding_waste)
        return d

    def merge(self, other: "GenerationMetrics") -> "GenerationMetrics":
        """Sum of two calls (for a partition run in several calls); peaks take the max."""
        out = GenerationMetrics()
        for k, v in asdict(self).items():
            w = getattr(other, k)
            if k in ("peak_memory_bytes", "kv_cache_bytes", "batch_slots", "kv_bytes_per_row"):
                setattr(out, k, max(v, w))
            else:
                setattr(out, k, v + w)
        return out

    def __str__(self) -> str:
        return (f"{self.n_prompts} prompts, {self.prompt_tokens} prompt + {self.generated_tokens} generated tokens in "
                f"{self.wall_s:.2f}s ({self.tokens_per_s:.1f} gen tok/s; prefill {self.prefill_s:.2f}s "
                f"{self.prefill_tokens_per_s:.0f} tok/s, decode {self.decode_s:.2f}s "
                f"{self.decode_tokens_per_s:.1f} tok/s), padding {100 * self.padding_waste:.1f}%, "
                f"peak {self.peak_memory_bytes / 2**20:.0f} MiB")


def rss_bytes() -> int:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak on GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval = torch.device(device), interval_s
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


class Timer:
    def __init__(self):
        self.s = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self._t
