"""The OOM boundary, found by search instead of by hand (the talk, 3.5).

For one (input length, output length, model, device, tp) configuration, `search_max_batch`
doubles the batch size until a probe does not fit, then bisects between the last batch
that fit and the first that did not. A probe "does not fit" when the device raises a
real out-of-memory error (GPU) or when its measured peak memory exceeds the configured
budget (CPU, where running out would mean swapping or the kernel's OOM killer).
Assumes memory grows with batch size, which it does: KV cache and activations are
linear in it.

`oom_table` turns the probes of several configurations into the talk's table: rows are
batch sizes, columns configurations, cells the latency or "OOM".
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Probe:
    batch_size: int
    fits: bool
    metrics: dict = field(default_factory=dict)
    reason: str = ""            # why it did not fit: "cuda OOM", "peak 3.1 GiB > budget 3.0 GiB"


@dataclass
class Boundary:
    max_batch: int              # largest batch that fits (0: not even batch 1)
    probes: dict[int, Probe]    # every batch size tried
    capped: bool = False        # the search stopped at `limit` without failing

    @property
    def first_oom(self) -> int | None:
        bad = [b for b, p in self.probes.items() if not p.fits]
        return min(bad) if bad else None


def search_max_batch(probe: Callable[[int], Probe], limit: int = 4096, start: int = 1,
                     on_probe: Callable[[Probe], None] | None = None) -> Boundary:
    """Exponential then binary search for the largest batch size with probe(b).fits.

    Probes O(2 log2(boundary)) batch sizes; each is tried at most once."""
    probes: dict[int, Probe] = {}

    def run(b: int) -> bool:
        if b not in probes:
            probes[b] = probe(b)
            if on_probe:
                on_probe(probes[b])
        return probes[b].fits

    good, bad, b = 0, None, max(1, start)
    while b <= limit:                     # 1, 2, 4, ... until the first failure
        if not run(b):
            bad = b
            break
        good = b
        if b == limit:
            break
        b = min(2 * b, limit)
    if bad is None:
        return Boundary(good, probes, capped=True)
    while bad - good > 1:                 # invariant: good fits (or is 0), bad does not
        mid = (good + bad) // 2
        if run(mid):
            good = mid
        else:
            bad = mid
    return Boundary(good, probes)


def memory_probe(measure: Callable[[int], dict], budget_bytes: float | None, metric: str = "peak_memory_bytes",
                 is_oom: Callable[[BaseException], bool] | None = None) -> Callable[[int], Probe]:
    """A probe from a measurement function: fits when it ran (no device OOM) and
    metrics[metric] <= budget_bytes (no budget: only a real OOM stops it)."""
    is_oom = is_oom or default_is_oom

    def probe(b: int) -> Probe:
        try:
            m = measure(b)
        except BaseException as e:  # noqa: BLE001 - only OOMs are swallowed
            if is_oom(e):
                return Probe(b, False, {}, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            raise
        used = m.get(metric, 0.0)
        if budget_bytes is not None and used > budget_bytes:
            return Probe(b, False, m, f"{metric} {used / 2**30:.3f} GiB > budget {budget_bytes / 2**30:.3f} GiB")
        return Probe(b, True, m)

    return probe


def default_is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(e, (MemoryError,)):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


# ------------------------------------------------------------------- the table

def table_rows(columns: dict[str, Boundary], value: str = "wall_s", fmt: str = "{:.3f}") -> tuple[list[int], dict]:
    """Rows (batch sizes) and cells {(batch, column): text}. Probed powers of two, plus each
    column's exact boundary and the batch just above it. Cells above a column's
    boundary read OOM whether probed or implied; cells not probed read '-'."""
    rows: set[int] = set()
    for bd in columns.values():   # the talk's rows (powers of two), plus each exact boundary
        rows.update(b for b in bd.probes if b & (b - 1) == 0)
        rows.update(b for b in (bd.max_batch, bd.max_batch + 1) if b in bd.probes)
    rows = sorted(rows)
    cells = {}
    for col, bd in columns.items():
        for b in rows:
            p = bd.probes.get(b)
            if b > bd.max_batch and not bd.capped:
                cells[(b, col)] = "OOM"
            elif p is not None and p.fits and value in p.metrics:
                cells[(b, col)] = fmt.format(p.metrics[value])
            else:
                cells[(b, col)] = "-"
    return rows, cells


def oom_table_csv(columns: dict[str, Boundary], value: str = "wall_s") -> str:
    rows, cells = table_rows(columns, value)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["batch_size", *columns])
    for b in rows:
        w.writerow([b, *(cells[(b, c)] for c in columns)])
    w.writerow(["max_batch", *(bd.max_batch if not bd.capped else f">={bd.max_batch}" for bd in columns.values())])
    return buf.getvalue()


def oom_table_markdown(columns: dict[str, Boundary], value: str = "wall_s", title: str = "") -> str:
    rows, cells = table_rows(columns, value)
    names = list(columns)
    lines = [f"### {title}", ""] if title else []
    lines += ["| batch | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for b in rows:
        lines.append(f"| {b} | " + " | ".join(cells[(b, c)] for c in names) + " |")
    lines.append("| **max batch** | " + " | ".join(
        f"**{bd.max_batch}**" if not bd.capped else f"**>={bd.max_batch}**" for bd in columns.values()) + " |")
    lines += ["", f"Cells: {value} of the whole batch in seconds; OOM = over the memory budget "
                  "(probed, or implied by a smaller batch that did not fit); - = not probed."]
    return "\n".join(lines) + "\n"


def boundaries_from_records(records: list[dict], column: str = "oom_column") -> dict[str, Boundary]:
    """Rebuild each column's search from flat probe records (e.g. MLflow runs: params as
    strings, metrics as floats): batch_size, fits (0/1) and the probe's metrics."""
    probes: dict[str, dict[int, Probe]] = {}
    for r in records:
        b = int(float(r["batch_size"]))
        metrics = {k: v for k, v in r.items() if isinstance(v, float)}
        probes.setdefault(str(r[column]), {})[b] = Probe(b, bool(float(r["fits"])), metrics)
    def order(col):   # smallest model first, then the smaller budget
        r = next(r for r in records if str(r[column]) == col)
        return (float(r.get("n_params") or 0), float(r.get("oom_budget_gb") or 0) if str(r.get("oom_budget_gb")) not in
                ("", "None") else 0.0, col)
    out = {}
    for col in sorted(probes, key=order):
        ps = probes[col]
        good = [b for b, p in ps.items() if p.fits]
        bad = [b for b, p in ps.items() if not p.fits]
        out[col] = Boundary(max(good, default=0), dict(sorted(ps.items())), capped=not bad)
    return out


def oom_tables(records: list[dict]) -> tuple[dict[str, Boundary], dict[str, str]]:
    """Each column's boundary from flat probe records, and the table as files
    {"oom_table.csv": ..., "oom_table.md": ...}."""
    cols = boundaries_from_records(records)
    return cols, {"oom_table.csv": oom_table_csv(cols),
                  "oom_table.md": oom_table_markdown(cols, title="OOM boundary (batch size x model/device config)")}
