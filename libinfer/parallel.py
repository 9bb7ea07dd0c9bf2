"""Tensor parallelism applied to the unchanged decoder (gpt-fast's tp.py idea).

Attention heads are split along KV groups (a rank owns whole groups: its KV heads and
their query heads), the MLP along its intermediate dimension. q/k/v and gate/up are
column-parallel, `wo` and `w2` row-parallel, followed by one all-reduce each (the
model's `all_reduce`). Embeddings, norms and the LM head are replicated: the head is ~20% of SmolLM2's
weights, but replicating it saves a gather of [B, vocab] logits on every step.
Uneven splits are allowed (SmolLM2's 3 KV heads on 2 ranks: 2+1), which vLLM refuses;
with fewer KV heads than ranks each KV head is copied to world / KV ranks, which split
its query heads (as vLLM does).

Rank 0 lives in the calling process and drives the scheduler; ranks 1..N-1 are
processes it spawns, which execute the same runner calls, sent over a queue. Process
groups are built directly on a private TCPStore (not the global default group), so a
Spark worker can hold several generators.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .loading import Checkpoint, ModelConfig

log = logging.getLogger("libinfer")


class TensorParallelError(RuntimeError):
    """A rank died, hung past the timeout, or failed; the group is unusable afterwards."""


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `total` items over `parts` ranks, the first ranks one larger."""
    base, extra = divmod(total, parts)
    out, a = [], 0
    for r in range(parts):
        b = a + base + (1 if r < extra else 0)
        out.append((a, b))
        a = b
    return out


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    cfg: ModelConfig
    rank: int
    world: int

    def __post_init__(self):
        kv, g, w = self.cfg.n_kv_heads, self.cfg.n_heads // self.cfg.n_kv_heads, self.world
        if kv < w and (w % kv or g % (w // kv)):
            raise ValueError(f"tp_size={w} exceeds the model's {kv} KV heads and does not divide them into "
                             f"equal copies ({kv} KV heads x {g} query heads each)")

    @property
    def replicas(self) -> int:
        """Ranks holding a copy of each KV head: 1, or world / KV heads when there are fewer
        KV heads than ranks (Gemma 3 270M's one KV head on 2 ranks: each holds it, with 2 of
        its 4 query heads)."""
        return max(1, self.world // self.cfg.n_kv_heads)

    @property
    def kv(self) -> tuple[int, int]:
        if self.replicas > 1:
            head = self.rank // self.replicas
            return head, head + 1
        return split(self.cfg.n_kv_heads, self.world)[self.rank]

    @property
    def q(self) -> tuple[int, int]:
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        a, b = self.kv
        if self.replicas > 1:       # this rank's share of its KV head's query heads
            share = g // self.replicas
            a = a * g + (self.rank % self.replicas) * share
            return a, a + share
        return a * g, b * g

    @property
    def mlp(self) -> tuple[int, int]:
        return split(self.cfg.intermediate_size, self.world)[self.rank]

    def local_config(self) -> ModelConfig:
        (q0, q1), (k0, k1), (m0, m1) = self.q, self.kv, self.mlp
        return dataclasses.replace(self.cfg, n_heads=q1 - q0, n_kv_heads=k1 - k0, intermediate_size=m1 - m0)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Slice one full tensor to this rank's part (called as each tensor is read)."""
        part = name.rsplit(".", 1)[-1].removesuffix("_bias")
        d = self.cfg.head_dim
        rows = {"q": self.q, "k": self.kv, "v": self.kv}
        if part in rows:
            a, b = rows[part]
            return t[a * d:b * d].clone()
        if part == "o":
            if name.endswith("_bias"):   # a row-parallel bias is added once, by rank 0
                return t if self.rank == 0 else torch.zeros_like(t)
            a, b = self.q
            return t[:, a * d:b * d].clone()
        if part in ("gate", "up"):
            a, b = self.mlp
            return t[a:b].clone()
        if part == "down":
            a, b = self.mlp
            return t[:, a:b].clone()
        return t                                             # replicated


def _process_group(store, rank: int, world: int, device: torch.device, timeout_s: float):
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def build_shard(ckpt: Checkpoint, rank: int, world: int, dtype, device, pg, quantization: str = "none"):
    """This rank's model: local shapes, its slices of the weights (quantised after slicing),
    the all-reduce."""
    from .generator import LocalRunner
    from .models import build
    plan = ShardPlan(ckpt.config, rank, world)
    model = build(plan.local_config(), dtype, device, quantization)
    model.load_weights(ckpt.tensors(), shard=plan)

    model.all_reduce = lambda out: pg.allreduce([out]).wait()   # after each row-parallel projection
    return LocalRunner(model, device)


def _poll_key(store, key: str, give_up) -> bytes | None:
    """store.get(key) once it exists; polls with check() (store.wait's timeouts log noise),
    spinning briefly so a decode step's command is picked up in microseconds."""
    pause = 1e-5
    while True:
        try:
            if store.check([key]):
                return store.get(key)
        except (RuntimeError, OSError):      # the store's owner (rank 0) is gone
            if give_up(store_lost=True):
                return None
            raise
        if give_up():
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _wait_key(store, key: str, procs, deadline: float) -> bytes:
    def give_up(store_lost: bool = False):
        if any(p.poll() is not None for p in procs):
            raise TensorParallelError("a rank exited")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"no {key!r} from a rank within the timeout")
        return False
    return _poll_key(store, key, give_up)


def _worker_main(rank: int, world: int, port: int, path: str, gguf_file, dtype: str, device: str,
                 threads: int, timeout_s: float, quantization: str = "none") -> None:
    """Rank 1..N-1: load the shard, then execute rank 0's runner calls until 'close'."""
    import pickle
    from .generator import parse_dtype
    parent = os.getppid()
    store = dist.TCPStore("127.0.0.1", port, world, False, timedelta(seconds=timeout_s))
    try:
        torch.set_num_threads(threads)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(rank)
            dev = torch.device("cuda", rank)
        store.set(f"hello/{rank}", b"1")
        pg = _process_group(store, rank, world, dev, timeout_s)
        runner = build_shard(Checkpoint.open(path, gguf_file), rank, world, parse_dtype(dtype), dev, pg, quantization)
        store.set(f"ready/{rank}", str(runner.weight_bytes()).encode())
        n = 0
        while True:
            msg = _poll_key(store, f"cmd/{n}", lambda store_lost=False: store_lost or os.getppid() != parent)
            if msg is None:                     # rank 0's process is gone
                return
            name, args = pickle.loads(msg)
            if name == "close":
                return
            with torch.inference_mode():
                getattr(runner, name)(*args)
            n += 1
    except BaseException as e:  # report, then die: rank 0 sees the broken collective
        try:
            store.set(f"error/{rank}", f"{type(e).__name__}: {e}".encode())
        finally:
            raise


class TensorParallelRunner:
    """Same interface as LocalRunner; each call runs on all ranks.

    Ranks 1..N-1 are fresh `python -m libinfer.parallel` processes (not multiprocessing
    children: a Spark worker's main module must not be re-imported). Calls reach them
    through the private TCPStore; the collectives themselves time out after `timeout_s`.
    """

    def __init__(self, ckpt: Checkpoint, tp_size: int, dtype, device, timeout_s: float = 300.0,
                 threads_per_rank: int | None = None, quantization: str = "none"):
        import subprocess
        import sys
        self.world, self.timeout_s, self.broken, self._n, self._read = tp_size, timeout_s, None, 0, 0
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.device_count() < tp_size:
            raise ValueError(f"tp_size={tp_size} needs {tp_size} GPUs, {torch.cuda.device_count()} visible")
        ShardPlan(ckpt.config, 0, tp_size)  # validate before starting anything
        threads = threads_per_rank or max(1, torch.get_num_threads() // tp_size)
        torch.set_num_threads(threads)
        self.device = torch.device("cuda", 0) if device.type == "cuda" else device
        self.store = dist.TCPStore("127.0.0.1", 0, tp_size, True, timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        dtype_name = str(dtype).removeprefix("torch.")
        self.procs = [subprocess.Popen([sys.executable, "-m", "libinfer.parallel", str(r), str(tp_size),
                                        str(self.store.port), str(ckpt.folder), ckpt.gguf_file or "", dtype_name,
                                        str(device), str(threads), str(timeout_s), quantization],
                                       # c10d logs a C++ warning when rank 0 goes away; the rank then exits quietly
                                       env={**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"})
                      for r in range(1, tp_size)]
        try:
            deadline = time.monotonic() + timeout_s
            for r in range(1, tp_size):
                _wait_key(self.store, f"hello/{r}", self.procs, deadline)
            pg = _process_group(self.store, 0, tp_size, self.device, timeout_s)
            self.local = build_shard(ckpt, 0, tp_size, dtype, self.device, pg, quantization)
            self.rank_weight_bytes = [self.local.weight_bytes()] + [
                int(_wait_key(self.store, f"ready/{r}", self.procs, deadline)) for r in range(1, tp_size)]
        except BaseException as e:
            self._fail(f"tensor-parallel ranks failed to start: {e}", e)
        log.info("tensor parallel: %d ranks, weights per rank %s MiB", tp_size,
                 [b // 2**20 for b in self.rank_weight_bytes])

    @property
    def dtype(self):
        return self.local.dtype

    @property
    def cache(self):
        return self.local.cache

    @property
    def prefixes(self):
        return self.local.prefixes

    def weight_bytes(self) -> int:
        return self.local.weight_bytes()

    def _send(self, name: str, *args) -> None:
        import pickle
        self.store.set(f"cmd/{self._n}", pickle.dumps((name, args)))
        self._n += 1

    def _forget_read_commands(self) -> None:
        # After a collective every rank has read all commands so far: drop them from the store.
        for k in range(self._read, self._n):
            self.store.delete_key(f"cmd/{k}")
        self._read = self._n

    def _call(self, name: str, *args):
        if self.broken:
            raise TensorParallelError(f"tensor-parallel group is broken ({self.broken}); create a new Generator")
        if any(p.poll() is not None for p in self.procs):
            self._fail("a rank is not running")
        self._send(name, *args)
        try:
            return getattr(self.local, name)(*args)
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", e)

    def _fail(self, why: str, cause: BaseException | None = None):
        reports = []
        for r in range(1, self.world):
            try:
                if self.store.check([f"error/{r}"]):
                    reports.append(f"rank {r}: {self.store.get(f'error/{r}').decode()}")
            except Exception:
                pass
        exits = []
        for r, p in enumerate(self.procs, 1):
            try:
                exits.append(f"rank {r} exit code {p.wait(timeout=2)}")   # a dead rank's exit lands shortly
            except Exception:
                pass
        self.broken = "; ".join([why] + reports + exits)
        self._kill()
        raise TensorParallelError(f"tensor-parallel generation failed: {self.broken}") from cause

    def allocate(self, n_slots: int, max_len: int, max_bytes: int | None = None, pool_tokens: int = 0):
        self._call("allocate", n_slots, max_len, max_bytes, pool_tokens)
        return self.local.cache

    def prefill(self, tokens, spans, locs):
        logits = self._call("prefill", tokens, spans, locs)
        self._forget_read_commands()
        return logits

    def decode(self, tokens, pos, groups, prefix=None, segments=()):
        logits = self._call("decode", tokens, pos, groups, prefix, segments)
        self._forget_read_commands()
        return logits

    def copy_slot(self, src, dst, length):
        return self._call("copy_slot", src, dst, length)

    def _kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)

    def close(self):
        if not self.broken:
            try:
                self._send("close")
                for p in self.procs:
                    p.wait(timeout=10)
            except Exception:
                pass
            self.broken = "closed"
        self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass


if __name__ == "__main__":
    import sys
    r, w, port, path, gguf, dt, dev, th, to, quant = sys.argv[1:11]
    _worker_main(int(r), int(w), int(port), path, gguf or None, dt, dev, int(th), float(to), quant)
