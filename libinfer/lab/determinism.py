"""Determinism report (the talk's lessons 8-9): outputs can change with batch size, TP
degree, dtype and kernels. For one model and prompt set: the share of prompts whose
greedy output (token ids) is identical to the reference configuration's (batch size 1,
tp_size 1, float32) in each other configuration."""
from __future__ import annotations

from typing import Callable

from ..generator import Generator
from ..params import GenerationParams


def greedy_ids(gen: Generator, prompts: list, out_seq_length: int) -> list[tuple[int, ...]]:
    params = GenerationParams(greedy=True, out_seq_length=out_seq_length, ignore_eos=True)
    return [tuple(r.outputs[0].token_ids) if r.ok else () for r in gen.generate(prompts, params)]


def agreement(a: list, b: list) -> float:
    """Share of positions where a and b are equal."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else 1.0


def determinism_report(path, gguf_file, prompts: list[str], batch_sizes=(1, 8, 32), tp_sizes=(1, 2),
                       dtypes=("float32", "bfloat16"), out_seq_length: int = 16, device: str = "cpu",
                       log: Callable[[str], None] = lambda s: None) -> dict:
    """Metrics `batch_<b>`, `tp_<t>`, `dtype_<d>`: agreement with batch 1 / tp 1 / float32.
    Batch size is the generator's max_batch_size (rows decoded together); it is only read
    when a call plans its batches, so one loaded model serves every batch size."""
    ref_bs = batch_sizes[0]
    gen = Generator.from_pretrained(path, gguf_file, dtype="float32", device=device, max_batch_size=ref_bs)
    report: dict[str, float] = {"prompts": float(len(prompts))}
    try:
        outs = {}
        for b in batch_sizes:
            gen.max_batch_size = b
            outs[b] = greedy_ids(gen, prompts, out_seq_length)
            report[f"batch_{b}"] = agreement(outs[ref_bs], outs[b])
            log(f"batch size {b}: {report[f'batch_{b}']:.3f} of prompts identical to batch size {ref_bs}")
        base = outs[ref_bs]
    finally:
        gen.close()
    for t in tp_sizes:
        if t == 1:
            report["tp_1"] = 1.0
            continue
        with Generator.from_pretrained(path, gguf_file, dtype="float32", device=device, tp_size=t,
                                       max_batch_size=ref_bs) as g:
            report[f"tp_{t}"] = agreement(base, greedy_ids(g, prompts, out_seq_length))
        log(f"tp_size {t}: {report[f'tp_{t}']:.3f} identical to tp_size 1")
    for d in dtypes:
        if d in ("float32", "fp32"):
            report[f"dtype_{d}"] = 1.0
            continue
        with Generator.from_pretrained(path, gguf_file, dtype=d, device=device, max_batch_size=ref_bs) as g:
            report[f"dtype_{d}"] = agreement(base, greedy_ids(g, prompts, out_seq_length))
        log(f"dtype {d}: {report[f'dtype_{d}']:.3f} identical to float32")
    return report
