"""llama.cpp as a batched peer, through llama-cpp-python's low-level API.

llama-cpp-python's `Llama.generate` runs one prompt at a time, but llama.cpp itself
batches many sequences into one `llama_decode` call (what `llama-batched-bench`
measures). To compare our continuous batching with llama.cpp at its best, this module
drives `llama_decode` with a `llama_batch` directly:

- `generate_batched`: continuous batching over n_seq KV slots (seq_id = slot). Waiting
  prompts are admitted into free slots and prefilled packed into `llama_decode` calls
  of up to prefill_tokens tokens (logits only for each prompt's last token); then every
  step decodes one token for every running sequence in one call. Greedy argmax, EOS
  ignored, `new` tokens per prompt; a finished slot's cache is dropped with
  `llama_memory_seq_rm` and the slot takes the next prompt.
- `generate_one_at_a_time`: the same loop with one slot, prompt after prompt, so the
  two differ only in batching.
- `decode_batch1`: seconds per batch-1 decode step (prefill excluded).

Token ids in, token ids out: prompts are token ids of the same GGUF vocabulary and are
passed as given (no BOS added).

Weight formats (`weights`): "stored" is the bundled SmolLM2-135M GGUF as shipped (Q4_1
blocks, Q8_0 embedding/LM head). Other formats ("q4_0", "q8_0", "q4_k", ...: any
`LLAMA_FTYPE_MOSTLY_*` name) are made once by llama.cpp's own quantizer and cached under
$LIBINFER_CACHE/peer (default ~/.cache/libinfer/peer). No f16 source is on disk, so they
are requantized from the stored Q4_1/Q8_0 blocks (`allow_requantize`): q8_0 holds the
stored values almost exactly; q4_0 adds a second rounding on top of Q4_1's. K-quants
need rows divisible by 256, which SmolLM2's 576-wide rows are not, so llama.cpp falls
back to another type for most tensors of "q4_k".

    python benchmarks/peer_llama_cpp.py --check   # batched vs one at a time, agreement and tok/s
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("LIBINFER_CACHE", Path.home() / ".cache" / "libinfer")) / "peer"
FTYPE_ALIASES = {"q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q3_k": "Q3_K_M"}
_initialised = False
_unavailable: str | None = None


def available() -> bool:
    return not unavailable_reason()


def unavailable_reason() -> str:
    """Why llama.cpp cannot run here ("" when it can). A build for another CPU dies of
    SIGILL inside llama_decode (e.g. built with GGML_AVX_VNNI on an AVX-512 VNNI machine
    without AVX-VNNI), so a child process tries one decode first."""
    global _unavailable
    if _unavailable is None:
        if importlib.util.find_spec("llama_cpp") is None:
            _unavailable = "llama-cpp-python is not installed"
        else:
            rc = subprocess.run([sys.executable, __file__, "--smoke"], capture_output=True, timeout=120).returncode
            _unavailable = "" if rc == 0 else (
                f"llama-cpp-python is installed but a test decode failed ({_exit_text(rc)}): "
                "built for another CPU? (rebuild it with CMAKE_ARGS matching /proc/cpuinfo)")
    return _unavailable


def _exit_text(rc: int) -> str:
    import signal
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"


def _lib():
    """llama_cpp, with the backend initialised once and its log quiet except for errors
    (its default prints every tensor of every load and quantization)."""
    global _initialised
    import llama_cpp
    if not _initialised:
        from llama_cpp._logger import set_verbose
        set_verbose(False)
        llama_cpp.llama_backend_init()
        _initialised = True
    return llama_cpp


def weights(fmt: str = "stored") -> str:
    """Path of the bundled model in weight format `fmt`, quantized once by llama.cpp."""
    from libinfer import bundled_model
    folder, gguf = bundled_model()
    src = os.path.join(folder, gguf)
    if fmt == "stored":
        return src
    lib = _lib()
    name = FTYPE_ALIASES.get(fmt.lower(), fmt.upper())
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown llama.cpp weight format {fmt!r} (no LLAMA_FTYPE_MOSTLY_{name})")
    out = CACHE / f"{Path(gguf).stem}.{fmt.lower()}.gguf"
    if not out.exists():
        print(f"llama.cpp: quantizing {gguf} to {fmt} (requantizing its stored blocks) -> {out}", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        params = lib.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, os.cpu_count() or 1
        tmp = out.with_suffix(".part")        # a killed run leaves no half file under the real name
        if lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {fmt} failed")
        tmp.rename(out)
    return str(out)


@dataclass
class Peer:
    """A loaded llama.cpp model and context; `batch` holds up to n_batch tokens."""
    model: object
    ctx: object
    batch: object
    n_batch: int
    n_seq: int
    n_vocab: int
    path: str

    def close(self) -> None:
        lib = _lib()
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)


def load(path: str, threads: int, n_ctx: int, n_seq: int = 1, n_batch: int = 2048) -> Peer:
    """A context with n_seq KV slots of n_ctx tokens each (prompt + new tokens).

    The cache is not unified: each slot is its own stream, so a decode step attends over
    its own tokens only, as llama-batched-bench does by default. n_batch tokens go into
    one graph (n_ubatch = n_batch) so a packed prefill is one big matmul per weight, and
    at most max(n_seq, 1) rows of logits are kept (we ask only for each sequence's last)."""
    lib = _lib()
    model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    p = lib.llama_context_default_params()
    n_ctx = -(-n_ctx // 256) * 256            # llama.cpp pads each slot to 256 cells anyway
    p.n_seq_max, p.n_ctx = n_seq, n_ctx * n_seq
    p.n_batch = p.n_ubatch = n_batch = max(n_batch, n_seq)
    p.n_outputs_max = n_seq
    p.n_threads = p.n_threads_batch = threads
    p.kv_unified = False
    ctx = lib.llama_init_from_model(model, p)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    n_batch = lib.llama_n_batch(ctx)          # llama.cpp caps it at the context size
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    return Peer(model, ctx, lib.llama_batch_init(n_batch, 0, 1), n_batch, n_seq, n_vocab, path)


@dataclass
class _Seq:
    """One prompt in a slot: how much of it is in the cache, and what it generated."""
    index: int
    prompt: list[int]
    fed: int = 0
    out: list[int] = field(default_factory=list)


@dataclass
class Timing:
    """Where a run's time went: prefill calls apart from decode steps (batch-1 decode)."""
    wall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


def _decode(peer: Peer, rows: list[tuple[int, int, int, bool]]) -> list[int]:
    """One llama_decode of (token, pos, seq_id, wants_logits) rows; the greedy token of
    every row that wants logits, in row order."""
    lib, b = _lib(), peer.batch
    for i, (tok, pos, seq, want) in enumerate(rows):
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, want
    b.n_tokens = len(rows)
    rc = lib.llama_decode(peer.ctx, b)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc} for {len(rows)} tokens")
    return [int(np.ctypeslib.as_array(lib.llama_get_logits_ith(peer.ctx, i), shape=(peer.n_vocab,)).argmax())
            for i, row in enumerate(rows) if row[3]]


def _prefill_rows(running: dict[int, _Seq], budget: int) -> tuple[list, list[_Seq]]:
    """Up to `budget` prompt tokens of the slots still prefilling (a long prompt goes in
    chunks); logits on a prompt's last token. Returns the rows and the sequences whose
    prompt these rows finish, in row order of their logits."""
    rows, finishing = [], []
    for slot, s in sorted(running.items()):
        take = min(len(s.prompt) - s.fed, budget - len(rows))
        if take <= 0:
            continue
        for pos in range(s.fed, s.fed + take):
            rows.append((s.prompt[pos], pos, slot, pos == len(s.prompt) - 1))
        s.fed += take
        if s.fed == len(s.prompt):
            finishing.append(s)
    return rows, finishing


def _generate(peer: Peer, prompts: list[list[int]], new: int, n_seq: int, prefill_tokens: int
              ) -> tuple[Timing, list[list[int]]]:
    """The continuous-batching loop: admit, prefill (before any decode step, so new
    prompts join the running batch soon), decode one token for every running slot."""
    lib = _lib()
    n_seq = min(n_seq, peer.n_seq)
    budget = min(prefill_tokens, peer.n_batch)
    mem = lib.llama_get_memory(peer.ctx)
    lib.llama_memory_clear(mem, True)
    waiting, free = deque(enumerate(prompts)), list(range(n_seq))
    running: dict[int, _Seq] = {}
    outs: list[list[int]] = [[] for _ in prompts]
    t = Timing()
    t0 = time.perf_counter()

    def retire_finished() -> None:
        for slot in [k for k, s in running.items() if len(s.out) == new]:
            s = running.pop(slot)
            outs[s.index] = s.out
            lib.llama_memory_seq_rm(mem, slot, -1, -1)
            free.append(slot)

    while waiting or running:
        while waiting and free:
            slot = min(free)          # low slots first: contiguous seq ids make fewer ubatches
            free.remove(slot)
            i, p = waiting.popleft()
            running[slot] = _Seq(i, p)
        rows, finishing = _prefill_rows(running, budget)
        ts = time.perf_counter()
        if rows:
            for s, tok in zip(finishing, _decode(peer, rows)):
                s.out.append(tok)
            t.prefill_s += time.perf_counter() - ts
        else:
            live = sorted((slot, s) for slot, s in running.items())
            toks = _decode(peer, [(s.out[-1], len(s.prompt) + len(s.out) - 1, slot, True) for slot, s in live])
            for (_, s), tok in zip(live, toks):
                s.out.append(tok)
            t.decode_s += time.perf_counter() - ts
            t.decode_steps += 1
        retire_finished()
    t.wall_s = time.perf_counter() - t0
    return t, outs


def generate_batched(peer: Peer, prompts: list[list[int]], new: int, n_seq: int, prefill_tokens: int = 2048
                     ) -> tuple[float, list[list[int]]]:
    """(wall seconds, `new` greedy tokens per prompt) with up to n_seq prompts batched."""
    t, outs = _generate(peer, prompts, new, n_seq, prefill_tokens)
    return t.wall_s, outs


def generate_one_at_a_time(peer: Peer, prompts: list[list[int]], new: int, prefill_tokens: int = 2048
                           ) -> tuple[float, list[list[int]]]:
    """The same loop with one slot: what llama-cpp-python's `Llama.generate` user gets."""
    return generate_batched(peer, prompts, new, 1, prefill_tokens)


def decode_batch1(peer: Peer, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(seconds per decode step, wall seconds, tokens) for `new` greedy tokens of one prompt:
    the first token comes from the prefill, the new - 1 decode steps are timed alone."""
    t, outs = _generate(peer, [prompt], new, 1, max(len(prompt), 1))
    return t.decode_s / max(t.decode_steps, 1), t.wall_s, outs[0]


def rows_for(prompts: list[list[int]], new: int, threads: int, slots: int, prefill_tokens: int = 2048,
             formats: tuple[str, ...] = ("stored", "q4_0"), repeats: int = 3) -> dict[str, tuple[float, list[list[int]]]]:
    """{format: (median wall seconds, tokens)} of llama.cpp batched over `slots` slots, for
    throughput.py's rows "llama.cpp batched, <fmt>, n_seq=<slots>". Every format's context
    is loaded and warmed up first, then the repeats are interleaved across formats so
    machine noise hits them alike."""
    n_ctx = max(map(len, prompts)) + new + 1
    peers = {f: load(weights(f), threads, n_ctx, slots, prefill_tokens) for f in formats}
    try:
        for peer in peers.values():
            generate_batched(peer, prompts[:2], 2, slots, prefill_tokens)
        walls: dict[str, list[float]] = {f: [] for f in formats}
        tokens = {}
        for _ in range(repeats):
            for f, peer in peers.items():
                wall, tokens[f] = generate_batched(peer, prompts, new, slots, prefill_tokens)
                walls[f].append(wall)
        return {f: (statistics.median(walls[f]), tokens[f]) for f in formats}
    finally:
        for peer in peers.values():
            peer.close()


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy outputs share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _smoke() -> None:
    """One tiny decode: run in a child process by unavailable_reason()."""
    peer = load(weights("stored"), 1, 8)
    _decode(peer, [(1, 0, 0, False), (2, 1, 0, True)])


def _check() -> None:
    """Batched vs one at a time on throughput.py's workload: batching must not change the
    greedy tokens beyond float noise (different matmul shapes round differently)."""
    import argparse
    ap = argparse.ArgumentParser(description=_check.__doc__)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="stored,q4_0")
    args = ap.parse_args()
    if not available():
        sys.exit(f"llama.cpp: {unavailable_reason()}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import workload

    from libinfer import Checkpoint
    prompts = workload(Checkpoint.open(None).load_tokenizer(), args.prompts, 20, 500, seed=0)
    new, total = args.new_tokens, args.prompts * args.new_tokens
    n_ctx = max(map(len, prompts)) + new + 1
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, {new} new each, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    for fmt in args.formats.split(","):
        path = weights(fmt)
        one, batched = load(path, args.threads, n_ctx, 1, args.prefill_tokens), \
            load(path, args.threads, n_ctx, args.slots, args.prefill_tokens)
        generate_one_at_a_time(one, prompts[:1], 2, args.prefill_tokens)
        generate_batched(batched, prompts[:2], 2, args.slots, args.prefill_tokens)
        w1, t1 = generate_one_at_a_time(one, prompts, new, args.prefill_tokens)
        wb, tb = generate_batched(batched, prompts, new, args.slots, args.prefill_tokens)
        same = sum(a == b for a, b in zip(t1, tb))
        lead = statistics.mean(leading_equal(a, b) for a, b in zip(t1, tb))
        print(f"{fmt}: one at a time {w1:.2f}s ({total / w1:.1f} tok/s); batched n_seq={args.slots} {wb:.2f}s "
              f"({total / wb:.1f} tok/s, {w1 / wb:.2f}x); identical outputs {same}/{len(prompts)}, "
              f"mean leading equal tokens {lead:.1f}/{new}", flush=True)
        one.close()
        batched.close()


if __name__ == "__main__":
    _smoke() if sys.argv[1:] == ["--smoke"] else _check()
