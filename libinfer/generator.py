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
from .engine import BLOCK
from .engine.kv_cache import KVCache, PrefixCache, block_hashes
from .engine.scheduler import Scheduler
from .engine.sequence import RepetitionMask, Request, Sequence, StopRules
from .layers import attention_groups, check_quantization
from .loading import Checkpoint, ModelConfig
from .metrics import GenerationMetrics, PeakMemory, Timer
from .models import build
from .params import GenerationParams
from .structured import guide_of

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
class TokenLogprob:
    """A generated token's log-probability under the model (the raw distribution, before
    penalties, temperature and filters, as vLLM reports by default) and the `logprobs`
    most likely tokens at that step."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" | "eos" | "length"
    logprobs: list[TokenLogprob] | None = None    # one per token id, when params.logprobs is set


@dataclass
class TokenEvent:
    """What `on_token` is told after each generated token: `text` is the completion's final
    text once `finish_reason` is set (stop sequence cut, `restart` added), else None."""
    index: int
    candidate: int
    token_id: int
    finish_reason: str | None
    text: str | None


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
        self.prefixes = PrefixCache()     # what the cache's pool holds (one per pool: generators may share a runner)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def allocate(self, n_slots: int, max_len: int, max_bytes: int | None = None, pool_tokens: int = 0) -> KVCache:
        """A cache of at least n_slots x max_len and exactly pool_tokens of prefix pool,
        reused across calls (the pool's segments stay valid while its size does); when the
        slots must grow they grow in both dimensions (fewer re-allocations) as long as
        that stays in max_bytes."""
        c = self.cache
        if c is None or c.n_slots < n_slots or c.max_len < max_len or c.pool_tokens != pool_tokens:
            if c is not None and c.n_slots and c.max_len:
                merged = max(n_slots, c.n_slots), max(max_len, c.max_len)
                per_row_token = 2 * c.k[:, :1, :, :1].numel() * c.k.element_size()
                if max_bytes is None or (merged[0] * merged[1] + pool_tokens) * per_row_token <= max_bytes:
                    n_slots, max_len = merged
            keep_pool = c is not None and c.pool_tokens == pool_tokens
            pool = (c.pool_k, c.pool_v) if keep_pool else None
            self.cache = None  # free the old one before allocating the new one
            cfg = self.model.cfg
            attn = self.model.layers[0].attn
            self.cache = KVCache(cfg.n_layers, n_slots, attn.n_kv_heads, max_len, cfg.head_dim, self.dtype,
                                 self.device, 0 if keep_pool else pool_tokens)
            if keep_pool:
                self.cache.pool_k, self.cache.pool_v = pool
            elif self.prefixes.capacity != pool_tokens:
                self.prefixes.reset(pool_tokens)
            else:                              # same size, new storage: segments are computed again when read
                for seg in self.prefixes.index.values():
                    seg.ready = False
        return self.cache

    def prefill(self, tokens: list[int], spans, locs) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return self.model.prefill(t, spans, locs, self.cache)

    def decode(self, tokens: list[int], pos: list[int], groups, prefix=None, segments=()) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        p = torch.tensor(pos, dtype=torch.long, device=self.device)
        pre = None if prefix is None else torch.tensor(prefix, dtype=torch.long, device=self.device)
        return self.model.decode(t, p, self.cache, groups, pre, segments)

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
    prefix_cache: rows whose token ids begin with the same 16-token blocks share those
        blocks' K/V (computed once, stored once), within a call and across calls; off for
        comparisons.
    """

    def __init__(self, runner, tokenizer, config: ModelConfig, *, max_batch_size: int = 64,
                 max_batch_tokens: int = 2048, kv_cache_gb: float = 4.0, static_batching: bool = False,
                 max_model_len: int | None = None, prefix_cache: bool = True):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.kv_cache_gb, self.static_batching = kv_cache_gb, static_batching
        self.max_model_len = min(max_model_len or config.max_position, config.max_position)
        eos = set(config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.prefix_cache = prefix_cache
        self.quantization = "none"     # set by from_pretrained
        self._guidance = None
        self.load_s = 0.0
        self.warmup_s = 0.0

    @classmethod
    def from_pretrained(cls, path=None, gguf_file: str | None = None, dtype="float32", device="cpu",
                        tp_size: int = 1, warmup: bool = True, quantization: str | None = None,
                        **engine) -> "Generator":
        """quantization: none | int8 | int4, the projections' and LM head's weights quantised
        at load (CPU, bfloat16 only; see layers/linear.py)."""
        t0 = time.perf_counter()
        device = torch.device(device)
        dt = parse_dtype(dtype)
        quantization = check_quantization(quantization, dt, device)
        ckpt = Checkpoint.open(path, gguf_file)
        if tp_size > 1:
            from .parallel import TensorParallelRunner
            runner = TensorParallelRunner(ckpt, tp_size, dt, device, timeout_s=engine.pop("tp_timeout_s", 300.0),
                                          quantization=quantization)
        else:
            model = build(ckpt.config, dt, device, quantization)
            model.load_weights(ckpt.tensors())
            runner = LocalRunner(model, device)
        gen = cls(runner, ckpt.load_tokenizer(), ckpt.config, **engine)
        gen.checkpoint = ckpt
        gen.quantization = quantization
        gen.load_s = time.perf_counter() - t0
        if warmup:
            gen.warmup()
        return gen

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def prefixes(self) -> PrefixCache:
        return self.runner.prefixes

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

    def plan_cache(self, prompt_lengths: list[int], params: GenerationParams, pool_tokens: int = 0,
                   quiet: bool = False) -> tuple[int, int]:
        """KV-cache shape (slots, tokens per slot) for rows whose slots hold these prompt
        lengths (what their prefix segments do not), next to a pool of pool_tokens: slots
        as many as max_batch_size, the rows and kv_cache_gb allow. Every row passed
        _check_row, so at least one prompt's n candidates fit without a pool."""
        budget = self._kv_budget_tokens() - pool_tokens
        need = max(prompt_lengths) + params.out_seq_length
        # Round the length up (fewer re-allocations across calls), within context and budget.
        max_len = min(-(-need // 64) * 64, self.max_model_len, max(need, budget // params.n))
        want = min(self.max_batch_size, len(prompt_lengths) * params.n)
        n_slots = min(want, budget // max_len)
        if n_slots < want and not quiet:
            log.warning("kv_cache_gb=%.2f holds %d slots of %d tokens (max_batch_size %d): decoding %d rows at a "
                        "time", self.kv_cache_gb, n_slots, max_len, self.max_batch_size, n_slots)
        return n_slots, max_len

    @property
    def guidance(self):
        """Structured output's tokenizer side, built on the first guided call (~0.5 s)."""
        if self._guidance is None:
            from .structured import Guidance
            self._guidance = Guidance(self.tokenizer, self.config.vocab_size, self.eos_ids)
        return self._guidance

    def _guide(self, spec):
        """The compiled guide of a (field, value) spec, or None."""
        return None if spec is None else self.guidance.compile(*spec)

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

    def generate(self, prompts: Seq[str] | Seq[Seq[int]], params: GenerationParams | None = None,
                 guides: Seq | None = None, on_token=None) -> Results:
        """Generate for every prompt; a row that cannot run gets `error` and the others run.

        guides: optional, one per prompt: None (the call's guide from params, if any) or a
            mapping with one of guided_json / guided_regex / guided_choice for that row
            alone (rows of one parameter set with different schemas run together); a guide
            that does not compile rejects its row, naming the field.
        on_token: optional callable(TokenEvent), called in the loop after every generated
            token (streaming); it must be quick.
        """
        params = params or GenerationParams()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not one string")
        if guides is not None and len(guides) != len(prompts):
            raise ValueError(f"guides has {len(guides)} entries for {len(prompts)} prompts")
        t_start = time.perf_counter()
        results, metrics = Results(), GenerationMetrics(n_prompts=len(prompts))
        results.metrics = metrics
        requests = []
        call_guide = self._guide(params.guide)           # validated with params: compiled once per call
        for i, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else None
            ids, guide = [], None
            try:
                ids = self.encode(prompt, params)
                error = self._check_row(ids, params)
                if error is None:
                    own = guides[i] if guides is not None else None
                    guide = self._guide(guide_of(own)) if own else call_guide
            except (ValueError, TypeError) as e:       # GuideError is a ValueError
                error = str(e)
            results.append(RequestOutput(i, text, ids, error=error))
            if error is None:
                requests.append(Request(i, ids, params.n, guide))
                metrics.prompt_tokens += len(ids)
            else:
                metrics.n_rejected += 1
        if requests:
            with PeakMemory(self.device) as peak, torch.inference_mode():
                self._run(requests, params, results, metrics, t_start, on_token)
            metrics.peak_memory_bytes = peak.peak
        metrics.wall_s = time.perf_counter() - t_start
        return results

    def _plan_prefixes(self, requests, params) -> dict:
        """request index -> the prefix segment its rows read: the run of whole 16-token
        blocks it shares with other prompts of the call that saves the most (for a prompt
        with n > 1 candidates and no such run: its own blocks), or a longer segment kept
        from an earlier call; at least one token is left its own. The
        segments are allocated (or pinned, when kept) in the pool now, so every one the
        call needs fits at once; {} when they do not fit in kv_cache_gb beside one row."""
        if not self.prefix_cache or params.recompute:
            return {}
        hashes = {r.index: block_hashes(r.prompt_ids[:-1]) for r in requests}
        count: dict[int, int] = {}
        for r in requests:
            for h in hashes[r.index]:
                count[h] = count.get(h, 0) + 1
        wanted = {}                                    # request -> (hash, prefix ids, kept segment or None)
        for r in requests:
            hs = hashes[r.index]
            kept = self.prefixes.match(r.prompt_ids, hs)
            # The blocks shared with other prompts that save the most (readers - 1) x length: a few-shot
            # header read by 16 rows over the header plus a query that two rows repeat. Else, for
            # n > 1, the prompt's own blocks (its candidates share them).
            gain, shared = max(((count[hs[k - 1]] - 1) * k, k) for k in range(1, len(hs) + 1)) if hs else (0, 0)
            if not gain:
                shared = len(hs) if r.n > 1 else 0
            if kept is not None and kept.length >= shared * BLOCK:
                wanted[r.index] = (hs[kept.length // BLOCK - 1], r.prompt_ids[:kept.length], kept)
            elif shared:
                wanted[r.index] = (hs[shared - 1], r.prompt_ids[:shared * BLOCK], None)
        if not wanted:
            return {}
        distinct = {h: ids for h, ids, _ in wanted.values()}
        need = sum(len(ids) for ids in distinct.values())
        longest_own = max(len(r.prompt_ids) - len(wanted[r.index][1]) if r.index in wanted else len(r.prompt_ids)
                          for r in requests)
        if need + (longest_own + params.out_seq_length) * params.n > self._kv_budget_tokens():
            return {}
        if need > self.prefixes.capacity:              # a larger pool: what it kept is dropped with it
            self.prefixes.reset(-(-need // 256) * 256)
        segs = {}
        for attempt in range(2):
            for h, ids in distinct.items():
                seg = self.prefixes.match(ids, block_hashes(ids))
                seg = seg if seg is not None and seg.length == len(ids) else self.prefixes.add(ids, h)
                if seg is None:
                    break
                self.prefixes.attach(seg)              # pinned for the call (see _run's finally)
                segs[h] = seg
            else:
                break
            for seg in segs.values():                  # fragmented: start again from an empty pool
                self.prefixes.detach(seg)
            segs = {}
            self.prefixes.reset(self.prefixes.capacity)
        return {i: segs[h] for i, (h, _, _) in wanted.items()}

    def _run(self, requests, params, results, metrics, t_start, on_token=None) -> None:
        plan = self._plan_prefixes(requests, params)
        try:
            _Call(self, requests, params, results, metrics, t_start, plan, on_token).run()
        finally:
            for seg in {id(s): s for s in plan.values()}.values():
                self.prefixes.detach(seg)


class _Call:
    """One generate call's state, and its step loop: schedule -> run -> sample -> retire."""

    def __init__(self, gen: Generator, requests, params: GenerationParams, results, metrics, t_start, plan,
                 on_token=None):
        self.gen, self.params, self.results, self.metrics, self.t_start = gen, params, results, metrics, t_start
        self.on_token = on_token
        self.plan, self.runner, self.device = plan, gen.runner, gen.device
        own = [len(r.prompt_ids) - (plan[r.index].length if r.index in plan else 0) for r in requests]
        # The pool stays (and keeps its segments for later calls) unless it would cost these
        # rows slots: rows come before a cache of earlier calls' prefixes.
        pool = gen.prefixes.capacity
        if not plan and pool:
            want = min(gen.max_batch_size, len(requests) * params.n)
            if (max(own) + params.out_seq_length) * params.n > gen._kv_budget_tokens() - pool or \
                    gen.plan_cache(own, params, pool, quiet=True)[0] < want:
                gen.prefixes.reset(0)
                pool = 0
        n_slots, max_len = gen.plan_cache(own, params, pool)
        self.evictions0 = gen.prefixes.evictions
        cache = self.runner.allocate(n_slots, max_len, gen._kv_budget_bytes, pool)
        metrics.kv_cache_bytes, metrics.batch_slots = cache.nbytes, n_slots
        self.token_bytes = gen.config.kv_bytes_per_token(gen.dtype)
        self.sched = Scheduler(n_slots, gen.max_batch_tokens, static=gen.static_batching)
        self.sched.add(requests)
        self.seen = (RepetitionMask(n_slots, gen.config.vocab_size, self.device)
                     if params.repetition_penalty != 1.0 else None)
        self.base_seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.rules = StopRules(params, gen.eos_ids, gen.decode_text)
        self.finished: dict[int, dict[int, CompletionOutput]] = {r.index: {} for r in requests}

    def run(self) -> None:
        m = self.metrics
        while self.sched.has_work():
            admitted = self.sched.admit()
            with Timer() as t:
                if admitted:
                    rows, logits = self.prefill(admitted)
                else:
                    rows = [s for s in self.sched.running if not s.finish_reason]
                    logits = self.decode(rows)
                self.sample(rows, logits)
            if admitted:
                m.prefill_s += t.s
            else:
                m.decode_s += t.s
                m.decode_steps += 1
            self.retire()
        m.prefix_evictions += self.gen.prefixes.evictions - self.evictions0

    # ------------------------------------------------------------------ run

    def prefill(self, admitted: list[Request]) -> tuple[list[Sequence], torch.Tensor]:
        """Place the admitted prompts' candidates in slots and prefill what is not in a
        segment yet (a new segment first, once, before its readers). The first candidate
        is prefilled; the others copy its own positions. Returns every row and its logits."""
        firsts, pieces = [], []
        for r in admitted:
            seg = self.plan.get(r.index)
            if seg is not None:
                if not seg.ready:
                    pieces.append((None, list(seg.tokens), 0, (-1, seg.offset, seg.length)))
                    seg.ready = True
                    self.metrics.prefix_hit_tokens -= seg.length
                self.metrics.prefix_hit_tokens += seg.length       # once per prompt, as its prefill
            for j in range(r.n):
                s = Sequence.start(r, j, self.params, self.base_seed, self.device, seg)
                if r.guide is not None:
                    s.matcher = self.gen.guidance.matcher(r.guide)
                if seg is not None:
                    self.gen.prefixes.attach(seg)
                self.sched.place(s)
                if self.seen is not None:
                    self.seen.reset(s.slot, r.prompt_ids)
                if j == 0:
                    firsts.append(s)
                    pieces.append(self.own_piece(s, r.prompt_ids))
        logits = self.run_prefill(pieces)
        rows, row_logits = [], []
        for s, lg in zip(firsts, logits):
            forks = [f for f in self.sched.running if f.request == s.request and f is not s]
            for f in forks:
                self.runner.copy_slot(s.slot, f.slot, s.own_length)
            rows += [s, *forks]
            row_logits += [lg] * (1 + len(forks))
        return rows, torch.stack(row_logits)

    def decode(self, rows: list[Sequence]) -> torch.Tensor:
        """One token for every running row (or, with recompute, the whole sequence again)."""
        m = self.metrics
        if self.params.recompute:
            return self.run_prefill([self.own_piece(s, s.prompt_ids + s.tokens) for s in rows])
        pos = [s.length - 1 for s in rows]
        lengths = [s.own_length for s in rows]
        groups = attention_groups(lengths)                  # what the step's own-key attention reads
        by_seg: dict[int, tuple] = {}
        for b, s in enumerate(rows):
            if s.segment is not None:
                by_seg.setdefault(s.segment.offset, (s.segment.offset, s.segment.length, []))[2].append(b)
        prefix = [s.prefix for s in rows] if by_seg else None
        logits = self.runner.decode([s.tokens[-1] for s in rows], pos, groups, prefix, list(by_seg.values()))
        m.real_tokens += sum(lengths)
        m.padded_tokens += sum(L - n for a, e, L in groups for n in lengths[a:e])
        stored = sum(lengths) + sum(P for _, P, _ in by_seg.values())      # a segment counts once
        m.kv_bytes_per_row = max(m.kv_bytes_per_row, stored * self.token_bytes // len(rows))
        return logits

    @staticmethod
    def own_piece(s: Sequence, ids: list[int]) -> tuple:
        seg = s.segment
        return (s, ids[s.prefix:], s.prefix, (s.slot, 0 if seg is None else seg.offset, s.prefix))

    def run_prefill(self, pieces: list[tuple]) -> torch.Tensor:
        """Prefill (sequence, ids, start, (slot, segment offset, P)) pieces in calls of at
        most max_batch_tokens tokens; returns the logits of each sequence's last piece
        (a piece that computes a segment has no sequence and returns none)."""
        step = self.gen.max_batch_tokens
        chunks = [(ids[a:a + step], start + a, loc, seq is not None and a + step >= len(ids))
                  for seq, ids, start, loc in pieces for a in range(0, len(ids), step)]
        out, call, n_tok = [], [], 0
        for i, chunk in enumerate(chunks):
            call.append(chunk)
            n_tok += len(chunk[0])
            if i + 1 == len(chunks) or n_tok + len(chunks[i + 1][0]) > step:
                toks, spans = [], []
                for ids, start, _, _ in call:
                    spans.append((len(toks), len(ids), start))
                    toks += ids
                logits = self.runner.prefill(toks, spans, [loc for _, _, loc, _ in call])
                out.extend(logits[j] for j, (*_, last) in enumerate(call) if last)
                self.metrics.prefill_steps += 1
                self.metrics.prefill_tokens += len(toks)
                call, n_tok = [], 0
        return torch.stack(out)

    # --------------------------------------------------------- sample, retire

    def sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        p = self.params
        raw = logits
        guided = [b for b, s in enumerate(rows) if s.matcher is not None]
        if guided:                        # only what the grammar allows (before the filters: they see those)
            with Timer() as t:
                allowed = self.gen.guidance.mask([rows[b].matcher for b in guided]).to(logits.device)
                if len(guided) == len(rows):
                    logits = logits.masked_fill(~allowed, float("-inf"))
                else:
                    logits = logits.clone()
                    logits[guided] = logits[guided].masked_fill(~allowed, float("-inf"))
            self.metrics.guide_s += t.s
        block = None
        if p.min_tokens and not p.ignore_eos:     # a complete grammar decides the end, min_tokens or not
            block = torch.tensor([len(s.tokens) < p.min_tokens and not (s.matcher and s.matcher.is_accepting())
                                  for s in rows], device=self.device)
        slots = torch.tensor([s.slot for s in rows], device=self.device)
        logits = sampling.process(logits, p, None if self.seen is None else self.seen.rows(slots), block,
                                  self.gen.eos_ids)
        new = sampling.draw(logits, p, [s.rng for s in rows]).tolist()
        if self.seen is not None:
            self.seen.mark(slots, new)
        tops = sampling.logprobs(raw, new, p.logprobs) if p.logprobs is not None else None
        now = time.perf_counter() - self.t_start
        for b, (s, tok) in enumerate(zip(rows, new)):
            if not s.tokens and s.candidate == 0:
                self.metrics.ttft_s.append(now)
            if tops is not None:
                s.logprobs.append(TokenLogprob(tok, *tops[b]))
            s.append(tok, self.rules)
            if self.on_token is not None:
                done = s.finish_reason
                self.on_token(TokenEvent(s.request, s.candidate, tok, done,
                                         s.completion_text(self.rules) if done else None))

    def retire(self) -> None:
        """Finished rows leave (their slots are refilled by moving the last rows in); a
        prompt's result is complete when all its candidates are."""
        done, moves = self.sched.retire_finished()
        for src, dst, length in moves:
            self.runner.copy_slot(src, dst, length)
            if self.seen is not None:
                self.seen.move(src, dst)
        for s in done:
            if s.segment is not None:
                self.gen.prefixes.detach(s.segment)
            self.metrics.generated_tokens += len(s.tokens)
            cands = self.finished[s.request]
            cands[s.candidate] = CompletionOutput(s.completion_text(self.rules), s.tokens, s.finish_reason,
                                                  s.logprobs if self.params.logprobs is not None else None)
            if len(cands) == self.params.n:  # candidates finish in any order; keep candidate order
                self.results[s.request].outputs = [cands[j] for j in range(self.params.n)]
                self.metrics.latencies_s.append(time.perf_counter() - self.t_start)
