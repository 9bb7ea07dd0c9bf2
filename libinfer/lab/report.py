"""The lab report: the talk's figures and tables, and the fitted predictor, from lab
points (flat dicts: a point run's params and metrics, see `as_point`). No MLflow here:
jobs.report reads the runs and logs what `build_report` writes.

  latency_vs_output_tokens.png   latency is proportional to generated tokens (batch 1)
  memory_vs_tokens_x_batch.png   peak memory grows with input tokens x batch size
  time_vs_model_size.png         + size_ratio.md: time ratio for a 2x larger model (talk: ~1.25x)
  throughput_vs_batch.png        sorted vs unsorted (mixed lengths) as batch size grows
  replay.png                     the real corpus, arrival order vs sorted
  speedup.md                     relative speed normalised to a baseline config (= 1)
  oom_table.md / .csv            batch size x config: latency or OOM
  predictor.md / predictions.csv latency and memory fits, held-out error, named unseen sizes
"""
from __future__ import annotations

import csv
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import predictor
from .oom import oom_tables
from .sizes import SIZES, shape_facts, size_config


class ReportError(ValueError):
    """An option of the report does not fit the points; `option` names it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# ------------------------------------------------------------------------ points

NUMERIC = ("n_params", "n_layers", "hidden_size", "intermediate_size", "vocab_size", "kv_bytes_per_token",
           "dtype_bytes", "weight_bytes", "input_tokens", "output_tokens", "batch_size", "n_prompts", "tp_size",
           "input_spread", "threads", "max_batch_tokens", "max_prompt_tokens", "seed")


def as_point(params: dict, metrics: dict, **extra) -> dict:
    """A lab point from a run's params (strings: numbers and flags parsed back) and metrics."""
    out = dict(params)
    for k in NUMERIC:
        if k in out and out[k] not in (None, "", "None"):
            try:
                out[k] = float(out[k])
            except ValueError:
                pass
    for k in ("sorted", "pad_to_longest"):
        if k in out:
            out[k] = str(out[k]).lower() == "true"
    return {**out, **metrics, **extra}


def label(r: dict) -> str:
    return f"{r.get('model')} {r.get('device')} {r.get('dtype')} tp{int(float(r.get('tp_size') or 1))}"


# --------------------------------------------------------------------- analysis

def by(points, *keys) -> dict:
    groups = defaultdict(list)
    for p in points:
        groups[tuple(p.get(k) for k in keys)].append(p)
    return dict(sorted(groups.items(), key=lambda kv: tuple((0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))
                                                            for x in kv[0])))


def single_points(points):
    return [p for p in points if p.get("mode") == "single"]


def size_ratios(points, metric: str = "wall_s") -> dict:
    """Time ratio for a 2x larger model, from batch-1 points of at least two sizes.

    Uses the random ladder (size=...) when it has two sizes or more, else every model.
    Per workload (input, output tokens, device config): fit log2(time) = a + s log2(params);
    2^s is the time ratio for doubling the parameters. Also each consecutive pair,
    normalised to exactly 2x: (t2/t1)^(1/log2(P2/P1))."""
    rows, slopes = [], []
    singles = [p for p in single_points(points) if p.get("n_params")]
    ladder = [p for p in singles if p.get("size")]
    if len({p["n_params"] for p in ladder}) >= 2:   # one family of shapes; real models aside
        singles = ladder
    for (i, o, dev, dt, tp), grp in by(singles, "input_tokens", "output_tokens", "device", "dtype", "tp_size").items():
        per_size = {}
        for p in grp:
            per_size.setdefault(p["n_params"], []).append(p[metric])
        if len(per_size) < 2:
            continue
        sizes = sorted(per_size)
        t = [statistics.median(per_size[s]) for s in sizes]
        s, _ = np.polyfit(np.log2(sizes), np.log2(t), 1)
        slopes.append(s)
        pairs = [(t[k + 1] / t[k]) ** (1 / math.log2(sizes[k + 1] / sizes[k])) for k in range(len(sizes) - 1)]
        rows.append({"input_tokens": i, "output_tokens": o, "config": f"{dev} {dt} tp{int(tp or 1)}",
                     "sizes_M": [round(x / 1e6) for x in sizes], "times_s": t, "ratio_2x_fit": 2 ** s,
                     "ratio_2x_pairs": pairs})
    overall = 2 ** statistics.median(slopes) if slopes else float("nan")
    return {"rows": rows, "ratio_2x": overall}


def size_ratio_markdown(sr: dict) -> str:
    lines = ["## Time vs model size (batch 1)", "",
             f"**A 2x larger model takes {sr['ratio_2x']:.2f}x the time** (median over workloads of 2^slope of "
             "log2(time) vs log2(params); the talk saw ~1.25x on GPU).", "",
             "| input | output | config | sizes (M params) | e2e times (s) | 2x ratio (fit) | 2x ratio per pair |",
             "|---:|---:|---|---|---|---:|---|"]
    for r in sr["rows"]:
        lines.append(f"| {r['input_tokens']:.0f} | {r['output_tokens']:.0f} | {r['config']} | "
                     f"{', '.join(map(str, r['sizes_M']))} | {', '.join(f'{t:.3f}' for t in r['times_s'])} | "
                     f"{r['ratio_2x_fit']:.2f} | {', '.join(f'{x:.2f}' for x in r['ratio_2x_pairs'])} |")
    return "\n".join(lines) + "\n"


def ordered_labels(points) -> list[str]:
    """Config labels, smallest model first."""
    size = {}
    for p in points:
        size.setdefault(label(p), p.get("n_params") or 0)
    return sorted(size, key=lambda lb: (size[lb], lb))


def workload_key(p) -> str:
    spread = f"~{100 * p['input_spread']:.0f}%" if p.get("input_spread") else ""
    s = (f"{p.get('mode')} in{p.get('input_tokens', 0):.0f}{spread} out{p.get('output_tokens', 0):.0f} "
         f"b{p.get('batch_size', 0):.0f}")
    if p.get("mode") in ("multi", "replay"):
        s += " sorted" if p.get("sorted") else " unsorted"
    if p.get("pad_to_longest"):
        s += " padded"
    return s


def speedup_table(points, baseline: str | None, metric: str = "wall_s") -> tuple[str, str]:
    """Markdown: rows workloads, columns configs, cells baseline_time / time (baseline = 1),
    as the talk's 'V100x4 = 1' tables. Returns (markdown, baseline used)."""
    pts = [p for p in points if p.get("mode") in ("single", "multi", "replay") and metric in p]
    labels = ordered_labels(pts)
    if not labels:
        return "", ""
    base = baseline if baseline in labels else None
    if baseline and base is None:
        matches = [lb for lb in labels if baseline in lb]
        base = matches[0] if matches else None
        if base is None:
            raise ReportError("baseline", f"{baseline!r} matches none of the configs: {', '.join(labels)}")
    base = base or labels[0]
    if metric.endswith("_per_s"):   # a rate: higher is faster already
        def rel(b, v):
            return v / b
    else:
        def rel(b, v):
            return b / v
    cells = defaultdict(dict)
    for p in pts:
        cells[workload_key(p)].setdefault(label(p), []).append(p[metric])
    lines = [f"## Relative speed ({base} = 1; {metric}, higher is faster)", "",
             "| workload | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for wk in sorted(cells):
        row = cells[wk]
        if base not in row:
            continue
        b = statistics.median(row[base])
        vals = [f"{rel(b, statistics.median(row[lb])):.2f}" if lb in row else "-" for lb in labels]
        lines.append(f"| {wk} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n", base


def throughput_summary(points) -> str:
    """Sorted vs unsorted tokens/s per batch size (multi and replay points)."""
    lines = ["## Throughput: sorted vs unsorted (generated tokens/s)", "",
             "engine: packed = libinfer (prompts packed without padding; only decode attention pads), "
             "padded = every prompt left-padded to its batch's longest (HF generate / FasterTransformer static "
             "batches, the talk's setting), jobs.pipeline = the Spark job end to end (its length clustering "
             "instead of `sorted`). Padding: prefill + decode-attention share of the work.", "",
             "| mode | config | engine | input (spread) | batch | unsorted | sorted | sorted/unsorted | padding unsorted | padding sorted |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    pts = [p for p in points if p.get("mode") in ("multi", "replay")]
    def engine(p):
        if p.get("replay_via") == "pipeline":
            return "jobs.pipeline"
        return "padded" if p.get("pad_to_longest") else "packed"
    for (mode, lb, eng, i, spread, b), grp in by([{**p, "label": label(p), "engine": engine(p)} for p in pts],
                                                 "mode", "label", "engine", "input_tokens", "input_spread", "batch_size").items():
        s = [p for p in grp if p.get("sorted")]
        u = [p for p in grp if not p.get("sorted")]
        if not s or not u:
            continue
        ts, tu = (statistics.median(x["tokens_per_s"] for x in g) for g in (s, u))
        ps, pu = (statistics.median(x.get("prefill_padding", 0) + x.get("padding_waste", 0) for x in g) for g in (s, u))
        lines.append(f"| {mode} | {lb} | {eng} | {i or 0:.0f} ({100 * (spread or 0):.0f}%) | "
                     f"{b or 0:.0f} | {tu:.1f} | {ts:.1f} | {ts / tu:.2f} | "
                     f"{100 * pu:.0f}% | {100 * ps:.0f}% |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, ax, path: Path, grid: str | None = "major", legend: bool = True) -> bool:
    """Common finish of every figure: grid, legend, PNG written, figure closed."""
    import matplotlib.pyplot as plt
    if grid:
        ax.grid(alpha=.3, which=grid)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

def fig_latency_vs_output(points, path: Path) -> bool:
    pts = single_points(points)
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {lb: f"C{k % 10}" for k, lb in enumerate(ordered_labels(pts))}
    inputs = sorted({p["input_tokens"] for p in pts})
    styles = {i: ("-", "--", ":", "-.")[k % 4] for k, i in enumerate(reversed(inputs))}
    for (lb, i), grp in by([{**p, "label": label(p)} for p in pts], "label", "input_tokens").items():
        grp = sorted(grp, key=lambda p: p["output_tokens"])
        ax.plot([p["output_tokens"] for p in grp], [p["wall_s"] for p in grp], "o", linestyle=styles[i],
                color=colors[lb], label=f"{lb}, in {i:.0f}")
    ax.set(xlabel="generated tokens (ignore_eos)", ylabel="end-to-end latency (s)",
           title="Latency vs generated tokens (batch 1)")
    return _save(fig, ax, path)


def fig_memory(points, path: Path) -> bool:
    pts = [p for p in points if p.get("mode") in ("single", "multi", "oom") and "peak_memory_bytes" in p
           and p.get("batch_size")]
    if not pts:
        return False
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for lb, grp in by([{**p, "label": label(p)} for p in pts], "label").items():
        grp = sorted(grp, key=lambda p: p["input_tokens"] * p["batch_size"])
        x = [p["input_tokens"] * p["batch_size"] for p in grp]
        y = [p["peak_memory_bytes"] / 2**20 for p in grp]
        ax.plot(x, y, "o", label=lb[0], alpha=.8)
        ax2.plot(x, [v - min(y) for v in y], "o-", label=lb[0], alpha=.8)   # above the model's own floor
    ax.set(xscale="log", xlabel="input tokens x batch size", ylabel="peak memory (MiB)",
           title="Peak memory (runtime + weights + KV + activations)")
    ax2.set(xlabel="input tokens x batch size", ylabel="MiB above the config's smallest run",
            title="Growth: KV cache + activations")
    ax2.grid(alpha=.3)
    return _save(fig, ax, path)


def fig_model_size(points, sr: dict, path: Path) -> bool:
    if not sr["rows"]:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sr["rows"]:
        ax.plot(r["sizes_M"], r["times_s"], "o-",
                label=f"in {r['input_tokens']:.0f} out {r['output_tokens']:.0f} {r['config']}: 2x -> {r['ratio_2x_fit']:.2f}x")
    ax.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="end-to-end latency (s)",
           title=f"Time vs model size: 2x params -> {sr['ratio_2x']:.2f}x time (talk: ~1.25x)")
    return _save(fig, ax, path, grid="both")


def fig_throughput(points, path: Path) -> bool:
    pts = [{**p, "label": label(p), "pad": bool(p.get("pad_to_longest"))} for p in points if p.get("mode") == "multi"]
    # the sort study: workloads measured both sorted and unsorted
    keys = ("label", "pad", "input_tokens", "input_spread")
    both = {k for k, g in by(pts, *keys).items() if len({p["sorted"] for p in g}) == 2}
    pts = [p for p in pts if tuple(p.get(k) for k in keys) in both]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for (lb, pad, i, spread, srt), grp in by(pts, *keys, "sorted").items():
        grp = sorted(grp, key=lambda p: p["batch_size"])
        c = colors.setdefault((lb, pad, i, spread), f"C{len(colors) % 10}")
        ax.plot([p["batch_size"] for p in grp], [p["tokens_per_s"] for p in grp], "o-" if srt else "s--", color=c,
                label=f"{lb} {'padded' if pad else 'packed'}, in {i:.0f}+-{100 * (spread or 0):.0f}%, "
                      f"{'sorted' if srt else 'unsorted'}")
    ax.set(xscale="log", xlabel="batch size", ylabel="generated tokens/s", title="Throughput vs batch size")
    ax.set_xscale("log", base=2)
    return _save(fig, ax, path)


def fig_replay(points, path: Path) -> bool:
    pts = [p for p in points if p.get("mode") == "replay"]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [f"{label(p)}\nb{p.get('batch_size', 0) or 0:.0f} {'sorted' if p.get('sorted') else 'unsorted'}"
             f"\n{p.get('replay_via', '')}" for p in pts]
    ax.bar(range(len(pts)), [p.get("tokens_per_s", 0) for p in pts],
           color=["tab:green" if p.get("sorted") else "tab:gray" for p in pts])
    ax.set_xticks(range(len(pts)), names, fontsize=6)
    ax.set(ylabel="generated tokens/s", title="Real-corpus replay: arrival order vs sorted by length")
    return _save(fig, ax, path, grid=None, legend=False)


# -------------------------------------------------------------------- predictor

def predictor_report(points, predict_sizes=(), workloads=()) -> tuple[str, list[dict], dict]:
    """Fit, held-out error (largest model held out), predictions for named sizes at
    workloads "input,output,batch"."""
    recs = [p for p in points if p.get("mode") in ("single", "multi") and p.get("n_params") and "wall_s" in p]
    # The coefficients are hardware numbers of one device and dtype: fit the largest such group.
    groups = [g for g in by(recs, "device", "dtype", "tp_size").items() if len({p["model"] for p in g[1]}) >= 2]
    if not groups:
        return "## Predictor\n\nNeeds single/multi runs of at least two model sizes on one device/dtype.\n", [], {}
    (dev, dt, tp), recs = max(groups, key=lambda g: len(g[1]))
    lines = ["## Predictor: latency and peak memory from (params, input, output, batch, tp)", "",
             f"Fitted on the {len(recs)} single/multi runs on {dev} {dt} tp{int(tp or 1)} (the largest device/dtype "
             "group). Non-negative least squares on relative error; every coefficient is a hardware number. "
             "Held out: every run of the largest model (fitted on the smaller ones only).", ""]
    metrics, preds = {}, []
    fits = {}
    for target in ("latency", "memory"):
        ho = predictor.evaluate_heldout(recs, target)
        fits[target] = ho.full_fit
        metrics.update({f"predictor_{target}_heldout_mape": ho.heldout_mape,
                        f"predictor_{target}_heldout_max_err": ho.heldout_max_err,
                        f"predictor_{target}_train_mape": ho.train_fit.train_mape})
        unit = "s" if target == "latency" else "MiB"
        scale = 1 if target == "latency" else 2**-20
        lines += [f"### {target}", "",
                  f"Held out **{ho.held_out_model}** ({len(ho.rows)} runs): mean abs. error "
                  f"**{100 * ho.heldout_mape:.1f}%**, max {100 * ho.heldout_max_err:.1f}% "
                  f"(fit on {ho.train_fit.n_train} runs, in-sample error {100 * ho.train_fit.train_mape:.1f}%).", "",
                  "| term | coefficient (all runs) |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in ho.full_fit.explain().items()]
        lines += ["", f"| held-out run (in, out, batch) | measured {unit} | predicted {unit} | error |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['input_tokens']:.0f}, {r['output_tokens']:.0f}, {r['batch_size']:.0f} | "
                  f"{r['measured'] * scale:.3f} | {r['predicted'] * scale:.3f} | {100 * r['rel_error']:+.1f}% |"
                  for r in ho.rows]
        lines.append("")
    ref = max(recs, key=lambda p: p["n_params"])
    elem = ref.get("dtype_bytes", 4)
    lines += ["### Named unseen sizes (fitted on all runs)", "",
              "| model | params (M) | input | output | batch | latency (s) | peak memory (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in predict_sizes:
        if name not in SIZES:
            raise ReportError("predict_sizes", f"unknown size {name!r}; known: {', '.join(SIZES)}")
        c = size_config(name)
        for w in workloads:
            i, o, b = (int(x) for x in str(w).split(","))
            rec = {"model": name, **shape_facts(c, elem), "input_tokens": i, "output_tokens": o,
                   "batch_size": b, "n_prompts": b, "tp_size": 1}
            lat, mem = fits["latency"].predict(rec), fits["memory"].predict(rec)
            preds.append({**rec, "predicted_latency_s": lat, "predicted_peak_memory_bytes": mem})
            lines.append(f"| {name} | {c.n_params / 1e6:.0f} | {i} | {o} | {b} | {lat:.2f} | {mem / 2**20:.0f} |")
    return "\n".join(lines) + "\n", preds, metrics


# ------------------------------------------------------------------------ report

def build_report(points: list[dict], out: Path, baseline: str | None = None, speedup_metric: str = "wall_s",
                 with_predictor: bool = True, predict_sizes=(), predict_workloads=()) -> dict:
    """Write every figure and table that the points allow to `out`; returns headline metrics.
    baseline: the config label (or a substring of it) = 1 in the speed-up table."""
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {"points": len(points)}
    made = []
    sr = size_ratios(points)
    figures = {"latency_vs_output_tokens.png": lambda p: fig_latency_vs_output(points, p),
               "memory_vs_tokens_x_batch.png": lambda p: fig_memory(points, p),
               "time_vs_model_size.png": lambda p: fig_model_size(points, sr, p),
               "throughput_vs_batch.png": lambda p: fig_throughput(points, p),
               "replay.png": lambda p: fig_replay(points, p)}
    for name, draw in figures.items():
        if draw(out / name):
            made.append(name)
    summary = ["# Performance lab report", "", f"{len(points)} point runs.", ""]
    if sr["rows"]:
        (out / "size_ratio.md").write_text(size_ratio_markdown(sr))
        metrics["size_2x_time_ratio"] = sr["ratio_2x"]
        summary.append(size_ratio_markdown(sr))
    md, _ = speedup_table(points, baseline, speedup_metric)
    if md:
        (out / "speedup.md").write_text(md)
        summary.append(md)
    tp = throughput_summary(points)
    if tp.count("\n") > 4:
        summary.append(tp)
    oom = [p for p in points if p.get("mode") == "oom"]
    if oom:
        cols, tables = oom_tables(oom)
        for name, text in tables.items():
            (out / name).write_text(text)
        summary.append(tables["oom_table.md"])
        for col, bd in cols.items():
            metrics[re.sub(r"[^\w\-./]", "_", f"max_batch {col}")[:240]] = bd.max_batch
    if with_predictor:
        pmd, preds, pm = predictor_report(points, predict_sizes, predict_workloads)
        (out / "predictor.md").write_text(pmd)
        summary.append(pmd)
        metrics.update(pm)
        if preds:
            with open(out / "predictions.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(preds[0]))
                w.writeheader()
                w.writerows(preds)
    summary.append("Figures: " + ", ".join(made) if made else "No figures: no matching runs.")
    (out / "report.md").write_text("\n".join(summary) + "\n")
    return metrics
