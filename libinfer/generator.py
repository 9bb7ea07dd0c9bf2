"""Generator: the public API. Tokenizes, validates rows, drives the scheduler and the
model runner, applies stop rules, and returns results with the call's metrics."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from . import sampling
from .engine.kv_cache import KVCache
from .layers import attention_groups
from .loading import Checkpoint, ModelConfig
from .metrics import GenerationMetrics, PeakMemory, Timer
from .models import build
from .params import GenerationParams
from .scheduler import Request, Scheduler, Sequence

log = logging.getLogger("libinfer")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" | "eos" | "length"


@dataclass
class RequestOutput:
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None    # set when the row was rejected (no outputs then)

    @property
    def ok(self) -> bool:
        return self.error is None


class Results(list):
    """list[RequestOutput] in prompt order, plus `.metrics` of the call."""
    metrics: GenerationMetrics


class LocalRunner:
    """Runs the model in this process (tp_size=1). The tensor-parallel runner in
    parallel.py has the same methods and mirrors each call on every rank."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.cache: KVCache | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def allocate(self, n_slots: int, max_len: int, max_bytes: int | None = None) -> KVCache:
        """A cache of at least n_slots x max_len, reused across calls; when it must grow it
        grows in both dimensions (fewer re-allocations) as long as that stays in max_bytes."""
        c = self.cache
        if c is None or c.n_slots < n_slots or c.max_len < max_len:
            if c is not None:
                merged = max(n_slots, c.n_slots), max(max_len, c.max_len)
                per_row_token = c.nbytes // (c.n_slots * c.max_len)
                if max_bytes is None or merged[0] * merged[1] * per_row_token <= max_bytes:
                    n_slots, max_len = merged
            self.cache = None  # free the old one before allocating the new one
            cfg = self.model.cfg
            attn = self.model.layers[0].attn
            self.cache = KVCache(cfg.n_layers, n_slots, attn.n_kv_heads, max_len, cfg.head_dim, self.dtype, self.device)
        return self.cache

    def prefill(self, tokens: list[int], spans, slots) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return self.model.prefill(t, spans, slots, self.cache)

    def decode(self, tokens: list[int], pos: list[int], groups) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        p = torch.tensor(pos, dtype=torch.long, device=self.device)
        return self.model.decode(t, p, self.cache, groups)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_slot(src, dst, length)

    def weight_bytes(self) -> int:
        return self.model.weight_nbytes

    def close(self) -> None:
        pass


class Generator:
    """Batch text generation with our own decoder.

    max_batch_size: KV-cache slots, i.e. rows decoded together.
    max_batch_tokens: prompt tokens per prefill step (longer prompts are chunked).
    kv_cache_gb: memory budget of the KV cache; fewer slots are used when long prompts need it.
    static_batching: classic fixed batches instead of continuous batching (for comparisons).
    """

    def __init__(self, runner, tokenizer, config: ModelConfig, *, max_batch_size: int = 64,
                 max_batch_tokens: int = 2048, kv_cache_gb: float = 4.0, static_batching: bool = False,
                 max_model_len: int | None = None):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.kv_cache_gb, self.static_batching = kv_cache_gb, static_batching
        self.max_model_len = min(max_model_len or config.max_position, config.max_position)
        eos = set(config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.load_s = 0.0
        self.warmup_s = 0.0

    @classmethod
    def from_pretrained(cls, path=None, gguf_file: str | None = None, dtype="float32", device="cpu",
                        tp_size: int = 1, warmup: bool = True, **engine) -> "Generator":
        t0 = time.perf_counter()
        device = torch.device(device)
        dt = parse_dtype(dtype)
        ckpt = Checkpoint.open(path, gguf_file)
        if tp_size > 1:
            from .parallel import TensorParallelRunner
            runner = TensorParallelRunner(ckpt, tp_size, dt, device, timeout_s=engine.pop("tp_timeout_s", 300.0))
        else:
            model = build(ckpt.config, dt, device)
            model.load_weights(ckpt.tensors())
            runner = LocalRunner(model, device)
        gen = cls(runner, ckpt.load_tokenizer(), ckpt.config, **engine)
        gen.checkpoint = ckpt
        gen.load_s = time.perf_counter() - t0
        if warmup:
            gen.warmup()
        return gen

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    def warmup(self) -> float:
        """The first inference pays for allocations and kernel selection (the talk, 3.3):
        pay it here, outside any timing."""
        t0 = time.perf_counter()
        self.generate([[self.eos_ids[0] if self.eos_ids else 0] * 16] * 2,
                      GenerationParams(greedy=True, out_seq_length=4, ignore_eos=True))
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ helpers

    def encode(self, prompt, params: GenerationParams) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt + params.start).input_ids)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        if params.start:
            ids += self.tokenizer(params.start, add_special_tokens=False).input_ids
        return ids

    def _check_row(self, ids: list[int], params: GenerationParams) -> str | None:
        """Why this row cannot run (None when it can): it is rejected alone, the others run."""
        if not ids:
            return "empty prompt: it has no tokens"
        limit = self.max_model_len
        if len(ids) + params.out_seq_length > limit:
            return (f"prompt too long: {len(ids)} prompt tokens + out_seq_length {params.out_seq_length} "
                    f"exceed the model context of {limit} tokens")
        need, budget = (len(ids) + params.out_seq_length) * params.n, self._kv_budget_tokens()
        if need > budget:
            return (f"KV cache budget too small: {len(ids)} prompt tokens + out_seq_length {params.out_seq_length} "
                    f"(x n={params.n}) need {need} cached tokens, kv_cache_gb={self.kv_cache_gb:g} holds {budget}")
        return None

    @property
    def _kv_budget_bytes(self) -> int:
        return int(self.kv_cache_gb * 2**30)

    def _kv_budget_tokens(self) -> int:
        return self._kv_budget_bytes // self.config.kv_bytes_per_token(self.dtype)

    def plan_cache(self, prompt_lengths: list[int], params: GenerationParams) -> tuple[int, int]:
        """KV-cache shape (slots, tokens per slot) for these rows: slots as many as
        max_batch_size, the rows and kv_cache_gb allow. Every row passed _check_row, so at
        least one prompt's n candidates fit."""
        budget = self._kv_budget_tokens()
        need = max(prompt_lengths) + params.out_seq_length
        # Round the length up (fewer re-allocations across calls), within context and budget.
        max_len = min(-(-need // 64) * 64, self.max_model_len, max(need, budget // params.n))
        want = min(self.max_batch_size, len(prompt_lengths) * params.n)
        n_slots = min(want, budget // max_len)
        if n_slots < want:
            log.warning("kv_cache_gb=%.2f holds %d slots of %d tokens (max_batch_size %d): decoding %d rows at a "
                        "time", self.kv_cache_gb, n_slots, max_len, self.max_batch_size, n_slots)
        return n_slots, max_len

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, prompt_ids: Seq[int], continuation_ids: Seq[int]) -> list[float]:
        """Log-probability of each continuation token given the prompt and the continuation
        tokens before it (teacher forcing): one forward pass over prompt + continuation."""
        model = getattr(self.runner, "model", None)
        if model is None:
            raise NotImplementedError("score needs the model in this process (tp_size=1)")
        ids = [int(t) for t in prompt_ids] + [int(t) for t in continuation_ids]
        if not prompt_ids or not continuation_ids:
            return []
        if len(ids) > self.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed the model context of {self.max_model_len}")
        logits = model.forward_logits(torch.tensor(ids, dtype=torch.long, device=self.device))
        n_prompt = len(prompt_ids)
        logprobs = torch.log_softmax(logits[n_prompt - 1:-1], dim=-1)      # position i predicts token i+1
        target = torch.tensor(ids[n_prompt:], device=logprobs.device)
        return logprobs.gather(1, target[:, None])[:, 0].tolist()

    # --------------------------------------------------------------- the loop

    def generate(self, prompts: Seq[str] | Seq[Seq[int]], params: GenerationParams | None = None) -> Results:
        params = params or GenerationParams()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not one string")
        t_start = time.perf_counter()
        results, metrics = Results(), GenerationMetrics(n_prompts=len(prompts))
        results.metrics = metrics
        requests = []
        for i, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else None
            try:
                ids = self.encode(prompt, params)
                error = self._check_row(ids, params)
            except (ValueError, TypeError) as e:
                ids, error = [], str(e)
            results.append(RequestOutput(i, text, ids, error=error))
            if error is None:
                requests.append(Request(i, ids, params.n))
                metrics.prompt_tokens += len(ids)
            else:
                metrics.n_rejected += 1
        if requests:
            with PeakMemory(self.device) as peak, torch.inference_mode():
                self._run(requests, params, results, metrics, t_start)
            metrics.peak_memory_bytes = peak.peak
        metrics.wall_s = time.perf_counter() - t_start
        return results

    def _run(self, requests, params, results, metrics, t_start) -> None:
        n_slots, max_len = self.plan_cache([len(r.prompt_ids) for r in requests], params)
        cache = self.runner.allocate(n_slots, max_len, self._kv_budget_bytes)
        metrics.kv_cache_bytes, metrics.batch_slots = cache.nbytes, n_slots
        sched = Scheduler(n_slots, self.max_batch_tokens, static=self.static_batching)
        sched.add(requests)
        V = self.config.vocab_size
        seen = (torch.zeros(n_slots, V, dtype=torch.bool, device=self.device)
                if params.repetition_penalty != 1.0 else None)
        base_seed = params.seed if params.seed is not None else random.getrandbits(63)
        finished: dict[int, dict[int, CompletionOutput]] = {r.index: {} for r in requests}
        max_stop = max((len(s) for s in params.stop_sequences), default=0)

        def finish_check(seq: Sequence) -> None:
            tok, n_gen = seq.tokens[-1], len(seq.tokens)
            if tok in self.eos_ids and not params.ignore_eos and n_gen > params.min_tokens:
                seq.finish_reason = "eos"
                return
            if params.stop_sequences and n_gen >= params.min_tokens:
                prev = len(seq.text)
                seq.text = self.decode_text(seq.tokens)
                scan = max(0, prev - max_stop)
                hits = [i for i in (seq.text.find(s, scan) for s in params.stop_sequences) if i >= 0]
                if hits:
                    seq.text = seq.text[:min(hits)]
                    seq.finish_reason = "stop"
                    return
            if n_gen >= params.out_seq_length:
                seq.finish_reason = "length"

        def sample(rows: list[Sequence], logits: torch.Tensor) -> None:
            block = None
            if params.min_tokens and not params.ignore_eos:
                block = torch.tensor([len(s.tokens) < params.min_tokens for s in rows], device=self.device)
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            logits = sampling.process(logits, params, None if seen is None else seen[slots], block, self.eos_ids)
            new = sampling.draw(logits, params, [s.rng for s in rows]).tolist()
            if seen is not None:
                seen[slots, torch.tensor(new, device=self.device)] = True
            now = time.perf_counter() - t_start
            for s, tok in zip(rows, new):
                if not s.tokens and s.candidate == 0:
                    metrics.ttft_s.append(now)
                s.tokens.append(tok)
                finish_check(s)

        def run_prefill(seqs_and_starts: list[tuple[Sequence, list[int], int]]) -> torch.Tensor:
            """Prefill (sequence, ids, start) pieces in calls of at most max_batch_tokens
            tokens; returns the logits of each sequence's last piece."""
            pieces = []
            for seq, ids, start in seqs_and_starts:
                for a in range(0, len(ids), self.max_batch_tokens):
                    pieces.append((seq, ids[a:a + self.max_batch_tokens], start + a, a + self.max_batch_tokens >= len(ids)))
            out, call, n_tok = [], [], 0

            def flush():
                toks, spans, off = [], [], 0
                for _, ids, start, _ in call:
                    spans.append((off, len(ids), start))
                    toks += ids
                    off += len(ids)
                logits = self.runner.prefill(toks, spans, [s.slot for s, *_ in call])
                out.extend(logits[j] for j, (_, _, _, last) in enumerate(call) if last)
                metrics.prefill_steps += 1

            for piece in pieces:
                if call and n_tok + len(piece[1]) > self.max_batch_tokens:
                    flush()
                    call, n_tok = [], 0
                call.append(piece)
                n_tok += len(piece[1])
            flush()
            return torch.stack(out)

        while sched.has_work():
            admitted = sched.admit()
            if admitted:
                with Timer() as t:
                    firsts = []
                    for r in admitted:
                        first = None
                        for j in range(r.n):
                            s = Sequence(r.index, j, r.prompt_ids)
                            if not params.is_greedy:
                                s.rng = torch.Generator(device=self.device)
                                s.rng.manual_seed(sampling.row_seed(base_seed, r.prompt_ids, j))
                            sched.place(s)
                            first = s if first is None else first
                            if seen is not None:
                                seen[s.slot] = False
                                seen[s.slot, torch.tensor(r.prompt_ids, device=self.device)] = True
                        firsts.append(first)
                    logits = run_prefill([(s, s.prompt_ids, 0) for s in firsts])
                    rows, row_logits = [], []
                    for s, lg in zip(firsts, logits):
                        forks = [f for f in sched.running if f.request == s.request and f is not s]
                        for f in forks:
                            self.runner.copy_slot(s.slot, f.slot, len(s.prompt_ids))
                        rows += [s, *forks]
                        row_logits += [lg] * (1 + len(forks))
                    sample(rows, torch.stack(row_logits))
                metrics.prefill_s += t.s
            else:
                decoding = [s for s in sched.running if not s.finish_reason]
                with Timer() as t:
                    if params.recompute:
                        logits = run_prefill([(s, s.prompt_ids + s.tokens, 0) for s in decoding])
                    else:
                        pos = [s.length - 1 for s in decoding]
                        groups = attention_groups([p + 1 for p in pos])   # what the step's attention reads
                        logits = self.runner.decode([s.tokens[-1] for s in decoding], pos, groups)
                        metrics.real_tokens += sum(p + 1 for p in pos)
                        metrics.padded_tokens += sum(L - p - 1 for a, e, L in groups for p in pos[a:e])
                    sample(decoding, logits)
                metrics.decode_s += t.s
                metrics.decode_steps += 1
            done, moves = sched.retire_finished()
            for src, dst, length in moves:
                self.runner.copy_slot(src, dst, length)
                if seen is not None:
                    seen[dst] = seen[src]
            for s in done:
                metrics.generated_tokens += len(s.tokens)
                out = results[s.request]
                text = s.text if s.finish_reason == "stop" else self.decode_text(s.tokens)
                cands = finished[s.request]
                cands[s.candidate] = CompletionOutput(text + params.restart, s.tokens, s.finish_reason)
                if len(cands) == params.n:  # candidates finish in any order; keep candidate order
                    out.outputs = [cands[j] for j in range(params.n)]
                    metrics.latencies_s.append(time.perf_counter() - t_start)
