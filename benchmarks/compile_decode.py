"""torch.compile on our decode step, made to compile: does inductor's CPU backend beat eager?

Plain `torch.compile(model.decode)` fails on torch 2.13 CPU (decode_profile.py --compile:
bf16 in inductor's lowering of oneDNN's packed `_linear_pointwise`, fp32 in dynamo on
inference-mode tensors). This script removes those obstacles the way a user would, without
changing libinfer, and times what is left:

- the generate call runs under `no_grad` instead of `inference_mode` (the KV cache and the
  inputs are then ordinary tensors dynamo can trace);
- oneDNN's packed products (bf16) become opaque custom ops that inductor calls as they are
  (`Dense.__call__` patched); the elementwise ops around them (norms, rope, residual
  casts, the mask and softmax glue) are what inductor fuses into C++ kernels;
- the KV-cache write becomes a custom op that mutates the cache in place (functionalised,
  inductor copied the whole layer cache for every write: ~1.3 ms per kernel);
- the keys read per step are bucketed to multiples of --bucket (the mask hides the extra
  keys), so the compiled graph is reused across steps instead of recompiled for each length;
  the eager reference runs with the same patches (`eager, patched`) and without (`eager`).

Prints a table (step ms = decode seconds / decode steps, median of --repeats generate calls
of --new tokens after a 64-token prompt, batch --rows) and writes the section
'## torch.compile on the decode step' of benchmarks/RESULTS.md (--no-write: print only).

    python benchmarks/compile_decode.py [--rows 1,64] [--dtypes bfloat16,float32] [--new 65]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_kind, header, write_section  # noqa: E402

import libinfer.generator as G  # noqa: E402
from libinfer import Generator, GenerationParams  # noqa: E402
from libinfer.layers import attention as A  # noqa: E402
from libinfer.layers import linear as L  # noqa: E402
from libinfer.models import decoder as D  # noqa: E402

SECTION = "## torch.compile on the decode step"


@torch.library.custom_op("bench::linear_pointwise", mutates_args=())
def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attr: str, algo: str, n: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algo)


@_lp.register_fake
def _(x, w, b, attr, algo, n):
    return x.new_empty(x.shape[:-1] + (n,))


@torch.library.custom_op("bench::linear_binary", mutates_args=())
def _lb(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, post: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, post)


@_lb.register_fake
def _(x, other, w, b, post):
    return torch.empty_like(other)


@torch.library.custom_op("bench::cache_write", mutates_args=("ck", "cv"))
def _cw(ck: torch.Tensor, cv: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor) -> None:
    ck[rows, :, pos] = k
    cv[rows, :, pos] = v


@_cw.register_fake
def _(ck, cv, rows, pos, k, v):
    return None


def _dense_call(self, x, post=None, other=None):
    if self.packed is None:
        return L._post(F.linear(x, self.weight, self.bias), post, other)
    if post in ("mul", "add"):
        return _lb(x, other.contiguous(), self.packed, self.bias, post)
    attr, algo = L._ONEDNN_UNARY[post]
    return _lp(x, self.packed, self.bias, attr, algo, self.out_features)


def _decode_attention(self, x, step, cache_k, cache_v, pool_k, pool_v):
    """Attention._decode for one group of rows without prefix segments, the write a custom op."""
    b, d = x.shape[0], self.head_dim
    q, k, v = self._qkv(x, step)
    _cw(cache_k, cache_v, torch.arange(b, device=x.device), step.own_pos, k, v)
    qg = q.view(b, self.n_kv_heads, self.n_heads // self.n_kv_heads, d)
    keys = step.groups[0][2]
    o = F.scaled_dot_product_attention(qg, cache_k[:b, :, :keys], cache_v[:b, :, :keys],
                                       attn_mask=step.masks[self.window], scale=self.scale)
    return o.reshape(b, self.n_heads * d)


ORIGINAL = {"dense": L.Dense.__call__, "decode": A.Attention._decode, "groups": G.attention_groups, "torch": G.torch}


def give_out_features(m) -> None:
    """The packed layout hides a product's output size: the fake kernels need it."""
    for layer in m.layers:
        a, cfg = layer.attn, m.cfg
        a.qkv.out_features = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
        a.o.out_features = cfg.hidden_size
        for d in (layer.mlp.gate, layer.mlp.up):
            if d is not None:
                d.out_features = cfg.intermediate_size
        if layer.mlp.gate_up is not None:
            layer.mlp.gate_up.out_features = 2 * cfg.intermediate_size
        layer.mlp.down.out_features = cfg.hidden_size
    m.head.out_features = m.cfg.vocab_size


def set_patches(g: Generator, on: bool, bucket: int) -> None:
    """The changes the module docstring lists (process-wide), or the original code back."""
    if not on:
        L.Dense.__call__, A.Attention._decode = ORIGINAL["dense"], ORIGINAL["decode"]
        G.attention_groups, G.torch = ORIGINAL["groups"], ORIGINAL["torch"]
        return
    L.Dense.__call__ = _dense_call
    A.Attention._decode = _decode_attention
    G.attention_groups = lambda lengths, rows=16: [(0, len(lengths), min(-(-max(lengths) // bucket) * bucket,
                                                                          g.runner.cache.max_len))]
    G.torch = _NO_INFERENCE_MODE   # generate() under no_grad; the model's own decorator is skipped (__wrapped__)


_NO_INFERENCE_MODE = types.ModuleType("torch_without_inference_mode")
_NO_INFERENCE_MODE.__dict__.update(vars(torch))
_NO_INFERENCE_MODE.inference_mode = torch.no_grad


def step_ms(g: Generator, prompts, new: int, repeats: int) -> tuple[float, list]:
    params = GenerationParams(greedy=True, out_seq_length=new, ignore_eos=True)
    times, tokens = [], None
    for _ in range(repeats):
        r = g.generate(prompts, params)
        times.append(1e3 * r.metrics.decode_s / r.metrics.decode_steps)
        tokens = [o.outputs[0].token_ids for o in r]
    return statistics.median(times), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64", help="rows decoded together, comma-separated")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--new", type=int, default=65, help="new tokens per call (decode steps + 1)")
    ap.add_argument("--bucket", type=int, default=128, help="keys read per step rounded up to this")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes.split(","):      # one process per dtype: the patches are process-wide
        if dtype != args.dtypes.split(",")[0]:
            import subprocess
            cmd = [sys.executable, __file__, "--rows", args.rows, "--dtypes", dtype, "--new", str(args.new),
                   "--bucket", str(args.bucket), "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--no-write"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows += list(dict.fromkeys(ln for ln in out.splitlines() if ln.startswith(f"| {dtype} |")))
            continue
        g = Generator.from_pretrained(None, dtype=dtype)
        give_out_features(g.runner.model)
        for n_rows in map(int, args.rows.split(",")):
            words = "search query suggest cheap flights tokyo hotel weather recipe pasta running shoes".split()
            prompts = [g.tokenizer(" ".join(words[(r + i) % len(words)] for i in range(80))).input_ids[:64]
                       for r in range(n_rows)]
            m = g.runner.model
            set_patches(g, False, args.bucket)                           # the last row count's are undone
            m.__dict__.pop("decode", None)
            step_ms(g, prompts, 4, 1)                                    # warm
            eager_decode = m.decode
            compiled_decode = torch.compile(functools.partial(D.Decoder.decode.__wrapped__, m), dynamic=False)
            times = {"eager": [], "patched": [], "compiled": []}
            tokens = {}
            try:
                set_patches(g, True, args.bucket)
                m.decode = compiled_decode
                t0 = time.perf_counter()
                step_ms(g, prompts, args.new, 1)                         # compiles every key bucket
                compile_s = time.perf_counter() - t0
                for _ in range(args.repeats):                            # interleaved: noise hits all three
                    for name, on, decode in (("eager", False, eager_decode), ("patched", True, eager_decode),
                                             ("compiled", True, compiled_decode)):
                        set_patches(g, on, args.bucket)
                        m.decode = decode
                        ms, tokens[name] = step_ms(g, prompts, args.new, 1)
                        times[name].append(ms)
                eager, patched, compiled = (statistics.median(times[k]) for k in ("eager", "patched", "compiled"))
                comp = (f"{compiled:.2f} | {eager / compiled:.2f}x | {compile_s:.0f} | "
                        f"{'yes' if tokens['compiled'] == tokens['eager'] else 'no'}")
            except Exception as e:      # noqa: BLE001 - the failure is the measurement
                eager, patched = (statistics.median(times[k]) if times[k] else float("nan")
                                  for k in ("eager", "patched"))
                comp = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:100]} | - | - | -"
            line = (f"| {dtype} | {n_rows} | {eager:.2f} | {patched:.2f} | {comp} |")
            print(line, flush=True)
            rows.append(line)
    table = ("| dtype | rows | eager step ms | eager, patched step ms | compiled step ms | eager / compiled | "
             "compile + first call s | tokens = eager |\n|---|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows))
    text = (f"{SECTION} on {cpu_kind()}\n\n{header(sys.argv)}Bundled SmolLM2-135M, 64-token prompts ({args.rows} rows decoded "
            f"together), greedy, {args.new} new tokens, keys read bucketed to multiples of {args.bucket}; median of "
            f"{args.repeats} calls per column, one process per dtype.\n\n{table}\n")
    print(text)
    if not args.no_write:
        print("wrote", write_section(f"{SECTION} on {cpu_kind()}", text))


if __name__ == "__main__":
    main()
