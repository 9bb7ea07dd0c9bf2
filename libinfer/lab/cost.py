"""What a run costs: executors x wall hours x one executor's price, per 1M prompts and per
1M generated tokens. Plain dicts in, plain dicts out (no Spark or MLflow here): the jobs pass
their `cost`, `spark` and `model` config groups and the generate metrics (`rows`,
`generated_tokens`, `wall_s`, `workers`).

One executor's price per hour is `cost.usd_per_hour`, or `cost.rates[kind]` (USD per hour
per unit) x its units: vCPUs for kind `cpu`, GPUs for every other kind. Kind `auto` is
`gpu` when `model.device` is cuda, else `cpu`.

Executors billed (`cost.executors`, or the run's):
  - a local master (`local[N]`): 1, of N vCPUs (`local[*]`: this machine's cores) or
    `model.tp_size` GPUs;
  - a cluster: `spark.executor_instances` when set, else the Python workers that ran
    generate tasks / tasks per executor (`spark.executor_cores / spark.task_cpus`), each of
    `spark.executor_cores` vCPUs or `spark.executor.resource.gpu.amount` (else
    `model.tp_size`) GPUs.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass

DEFAULT_RATES = {"cpu": 0.048, "gpu": 1.0}


class CostError(ValueError):
    """A cost setting that cannot be priced; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class Billing:
    kind: str               # a key of cost.rates
    unit: str               # "vCPU" | "GPU"
    units: float            # per executor
    usd_per_hour: float     # one executor
    executors: int
    source: str             # how executors were counted

    def line(self) -> str:
        return (f"{self.executors} executor(s) x ${self.usd_per_hour:.4g}/h ({self.kind}: {self.units:g} {self.unit}"
                f"{'s' if self.units != 1 else ''} each; {self.source})")


def _get(d, key, default=None):
    if d is None:
        return default
    try:
        v = d.get(key, default) if hasattr(d, "get") else getattr(d, key, default)
    except Exception:  # noqa: BLE001 - a DictConfig without the key in struct mode
        return default
    return default if v is None else v


def kind_of(cost, device: str | None) -> str:
    kind = _get(cost, "kind", "auto")
    if kind == "auto":
        kind = "gpu" if str(device or "cpu").startswith("cuda") else "cpu"
    rates = dict(_get(cost, "rates", None) or DEFAULT_RATES)
    if kind not in rates and _get(cost, "usd_per_hour") is None:
        raise CostError("cost.kind", f"no rate for kind {kind!r} in cost.rates ({', '.join(rates)}): "
                                     f"add +cost.rates.{kind}=USD_PER_UNIT_HOUR or set cost.usd_per_hour")
    return kind


def executor_price(cost, kind: str, units: float) -> float:
    """USD per hour of one executor of `units` vCPUs or GPUs."""
    if _get(cost, "usd_per_hour") is not None:
        return float(_get(cost, "usd_per_hour"))
    rates = dict(_get(cost, "rates", None) or DEFAULT_RATES)
    return float(rates[kind]) * float(units)


def local_cores(master: str) -> int | None:
    """N of local[N] / local[N,F]; this machine's cores for local[*]; None when not local."""
    if master == "local":
        return 1
    m = re.fullmatch(r"local\[(\d+|\*)(?:,\s*\d+)?\]", master or "")
    if not m:
        return None
    return os.cpu_count() or 1 if m.group(1) == "*" else int(m.group(1))


def billing(cost, spark=None, model=None, workers: int | None = None) -> Billing:
    """Who is billed for a run: see the module docstring."""
    device = _get(model, "device", "cpu")
    kind = kind_of(cost, device)
    gpu = kind != "cpu"
    tp = float(_get(model, "tp_size", 1))
    master = str(_get(spark, "master", "local[*]"))
    cores = local_cores(master)
    if cores is not None:
        units, n, source = (tp if gpu else float(cores)), 1, f"local master {master}"
    else:
        conf = dict(_get(spark, "conf", None) or {})
        ex_cores = float(_get(spark, "executor_cores", 1))
        task_cpus = float(_get(spark, "task_cpus", 1))
        units = float(conf.get("spark.executor.resource.gpu.amount", tp)) if gpu else ex_cores
        if _get(spark, "executor_instances"):
            n, source = int(_get(spark, "executor_instances")), "spark.executor_instances"
        else:
            per_executor = max(1, int(ex_cores // task_cpus))
            n = max(1, math.ceil(int(workers or 1) / per_executor))
            source = f"{int(workers or 1)} Python worker(s), {per_executor} task(s) per executor"
    if _get(cost, "executors") is not None:
        n, source = int(_get(cost, "executors")), "cost.executors"
    return Billing(kind, "GPU" if gpu else "vCPU", units, executor_price(cost, kind, units), n, source)


def figures(wall_s: float, rows: float, generated_tokens: float, b: Billing) -> dict:
    """Cost figures of `wall_s` seconds of `b`'s executors (MLflow metric names)."""
    hours = b.executors * wall_s / 3600
    usd = hours * b.usd_per_hour
    return {"cost_usd": usd, "cost_usd_per_executor_hour": b.usd_per_hour, "cost_executors": b.executors,
            "cost_executor_hours": hours,
            "cost_per_1m_prompts_usd": usd / rows * 1e6 if rows else float("nan"),
            "cost_per_1m_generated_tokens_usd": usd / generated_tokens * 1e6 if generated_tokens else float("nan")}


def job_cost(metrics: dict, cfg, wall_s: float | None = None) -> dict:
    """The cost figures of a generate run: `metrics` is jobs.generate's metrics dict (rows,
    generated_tokens, wall_s, workers), `cfg` the job config (its cost, spark and model groups).
    `wall_s` overrides metrics["wall_s"] (the jobs pass their whole process's wall time: the
    executors are held from Spark's start to its stop). Returns figures() plus "_billing" (a Billing)."""
    b = billing(_get(cfg, "cost", None), _get(cfg, "spark", None), _get(cfg, "model", None), metrics.get("workers"))
    wall = float(metrics.get("wall_s", 0.0) if wall_s is None else wall_s)
    out = figures(wall, float(metrics.get("rows", 0)), float(metrics.get("generated_tokens", 0)), b)
    out["_billing"] = b
    return out


def cost_line(c: dict) -> str:
    """One summary line: '$0.0012 = ... ; $X per 1M prompts, $Y per 1M generated tokens'."""
    b = c.get("_billing")
    per = lambda v: "-" if v != v else f"${v:,.2f}"  # noqa: E731 - nan (no rows) prints as -
    who = b.line() if b is not None else f"{c['cost_executors']:g} executor(s) x ${c['cost_usd_per_executor_hour']:.4g}/h"
    return (f"cost: ${c['cost_usd']:.4g} for {c['cost_executor_hours']:.3g} executor-hours = "
            f"{per(c['cost_per_1m_prompts_usd'])} per 1M prompts, {per(c['cost_per_1m_generated_tokens_usd'])} "
            f"per 1M generated tokens ({who})")


def as_metrics(c: dict) -> dict:
    """The figures without the Billing (for log_metrics)."""
    return {k: v for k, v in c.items() if not k.startswith("_")}


def billing_dict(b: Billing) -> dict:
    return asdict(b)
