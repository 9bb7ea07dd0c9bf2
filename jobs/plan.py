"""jobs.plan: the capacity planner (the talk, 3.3: measure so as to plan hardware for sizes
not run yet). Fits libinfer.lab.predictor on the lab's MLflow runs (jobs.benchmark) and
answers how many executors a corpus needs to finish by a deadline, for how long, at what
cost, with the predictor's error on held-out runs printed beside the answer.

    python -m jobs.plan prompts=1000000 prompt_tokens=128 out_tokens=32 model=llama_1b device=cpu deadline_h=4
    python -m jobs.plan prompts=5e6 prompt_tokens=300 out_tokens=24 model=smollm2_135m deadline_h=12 cost.usd_per_hour=0.2
    python -m jobs.plan --help

An executor here is what the lab measured: one generator with the lab runs' `threads` CPU
threads (device=cpu) or `tp_size` GPUs, fed static batches of `batch_size` prompts. The
prompts are split evenly over the executors. Hours: predicted wall time of one executor's
share; cost = executors x hours x one executor's price (the `cost` group, as in the jobs).
"""
from __future__ import annotations

if not __package__:  # run as a file (python jobs/plan.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from jobs._config import ConfigError, CostConf, MlflowConf, validate_cost
from jobs._spark import entry_point

BENCHMARK_HINT = ("python -m jobs.benchmark -m mode=multi size=llama_35m,llama_70m,llama_140m "
                  "workload.input_tokens=[32,128] workload.output_tokens=[8,32] 'workload.batch_size=[1,8,32]' "
                  "workload.n_prompts=64 sweep=plan")
SHAPE_KEYS = ("n_params", "n_layers", "hidden_size", "intermediate_size", "kv_bytes_per_token", "weight_bytes",
              "dtype_bytes")


@dataclass
class PlanConf:
    mlflow: MlflowConf = MISSING
    prompts: float = MISSING               # prompts in the corpus (1e6 is fine)
    prompt_tokens: int = MISSING           # mean prompt length in tokens
    out_tokens: int = MISSING              # tokens generated per prompt
    model: str = MISSING                   # a model the lab ran, a lab size (llama_1b, llama_3b, ...), conf/model/NAME or a checkpoint path
    device: str = "cpu"                    # cpu | cuda
    dtype: Optional[str] = None            # null = the dtype with the most lab runs on the device
    tp_size: Optional[int] = None          # null = the tp_size with the most lab runs on the device
    deadline_h: float = MISSING            # hours the corpus must be done in
    batch_size: int = 64                   # prompts per batch on an executor (the jobs' model.max_batch_size)
    sweep: Optional[str] = None            # fit on one lab sweep (parent run id, name or tag); null = every lab run
    cost: CostConf = field(default_factory=CostConf)


ConfigStore.instance().store(name="plan_schema", node=PlanConf)


def validate(cfg) -> None:
    from omegaconf import OmegaConf

    def check(key, ok, msg):
        if not ok:
            raise ConfigError(key, msg)
    for key in ("prompts", "prompt_tokens", "out_tokens", "model", "deadline_h"):
        check(key, not OmegaConf.is_missing(cfg, key), f"is required, e.g. python -m jobs.plan prompts=1000000 "
              "prompt_tokens=128 out_tokens=32 model=llama_1b device=cpu deadline_h=4 (--help lists every key)")
    check("prompts", cfg.prompts >= 1, f"must be >= 1 (got {cfg.prompts})")
    check("prompt_tokens", cfg.prompt_tokens >= 1, f"must be >= 1 (got {cfg.prompt_tokens})")
    check("out_tokens", cfg.out_tokens >= 1, f"must be >= 1 (got {cfg.out_tokens})")
    check("deadline_h", cfg.deadline_h > 0, f"must be > 0 hours (got {cfg.deadline_h})")
    check("batch_size", cfg.batch_size >= 1, f"must be >= 1 (got {cfg.batch_size})")
    check("device", cfg.device == "cpu" or cfg.device.startswith("cuda"), f"must be cpu or cuda (got {cfg.device!r})")
    check("tp_size", cfg.tp_size is None or cfg.tp_size >= 1, f"must be >= 1 (got {cfg.tp_size})")
    validate_cost(cfg.cost)


# ------------------------------------------------------------------- lab records

def lab_records(points: list[dict]) -> list[dict]:
    """The lab points the predictor fits: single/multi runs with shape facts and a wall time,
    without the padded-engine emulation (pad_to_longest), which the jobs never run."""
    return [p for p in points if p.get("mode") in ("single", "multi") and p.get("n_params") and "wall_s" in p
            and not p.get("pad_to_longest")]


def _norm_device(d) -> str:
    return "cuda" if str(d or "cpu").startswith("cuda") else "cpu"


def fit_group(records: list[dict], device: str, dtype: str | None, tp: int | None) -> tuple[tuple, list[dict]]:
    """The (device, dtype, tp) group to fit: the asked device, the asked dtype/tp or the one with
    the most runs; it must hold at least two model sizes (the held-out error needs them)."""
    on = [r for r in records if _norm_device(r.get("device")) == _norm_device(device)]
    if dtype is not None:
        on = [r for r in on if _dtype_name(r.get("dtype")) == _dtype_name(dtype)]
    if tp is not None:
        on = [r for r in on if int(float(r.get("tp_size") or 1)) == tp]
    groups: dict[tuple, list[dict]] = {}
    for r in on:
        groups.setdefault((_norm_device(r.get("device")), _dtype_name(r.get("dtype")),
                           int(float(r.get("tp_size") or 1))), []).append(r)
    good = {k: g for k, g in groups.items() if len({r["model"] for r in g}) >= 2}
    if not good:
        have = ", ".join(f"{k[0]} {k[1]} tp{k[2]}: {len({r['model'] for r in g})} model(s)" for k, g in groups.items())
        raise ConfigError("device", f"no lab runs of two or more model sizes on device={device}"
                                    + (f" dtype={dtype}" if dtype else "") + (f" tp_size={tp}" if tp else "")
                                    + (f" (have {have})" if have else "")
                                    + f"; run jobs.benchmark first, e.g.: {BENCHMARK_HINT} model.device={device}")
    key = max(good, key=lambda k: len(good[k]))
    return key, good[key]


def _dtype_name(d) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(str(d), str(d))


def model_shape(name: str, records: list[dict], elem: int) -> tuple[dict, str]:
    """Shape facts of `name` (predictor inputs) and where they came from."""
    seen = [r for r in records if r.get("model") == name and all(k in r for k in SHAPE_KEYS)]
    if seen:
        return {k: float(seen[0][k]) for k in SHAPE_KEYS}, "the lab's runs of it"
    from libinfer.lab.sizes import SIZES, shape_facts, size_config
    if name in SIZES:
        return shape_facts(size_config(name), elem), "lab size ladder (libinfer/lab/sizes.py)"
    conf_file = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{name}.yaml"   # model=smollm2_135m
    path, gguf = name, None
    if conf_file.exists():
        from omegaconf import OmegaConf
        from jobs._model import ensure_model
        m = OmegaConf.load(conf_file)
        ensure_model(m)
        path, gguf = m.get("path"), m.get("gguf_file")
    elif not Path(name).expanduser().exists():
        raise ConfigError("model", f"{name!r} is no model of the lab's runs, no lab size ({', '.join(SIZES)}), "
                                   f"no conf/model/ group and no checkpoint path")
    from libinfer import Checkpoint
    return shape_facts(Checkpoint.open(path, gguf).config, elem), f"its checkpoint config ({path or 'bundled'})"


def workload(shape: dict, name: str, prompts: int, prompt_tokens: int, out_tokens: int, batch: int, tp: int) -> dict:
    return {"model": name, **shape, "input_tokens": prompt_tokens, "mean_prompt_tokens": prompt_tokens,
            "max_prompt_tokens": prompt_tokens, "output_tokens": out_tokens, "batch_size": batch,
            "n_prompts": prompts, "tp_size": tp}


# ------------------------------------------------------------------------- plan

def plan(points: list[dict], prompts: int, prompt_tokens: int, out_tokens: int, model: str, device: str,
         deadline_h: float, batch_size: int = 64, dtype: str | None = None, tp_size: int | None = None,
         cost=None) -> dict:
    """The answer from lab points (jobs.report.load_points): executors, hours, cost, and the
    predictor's held-out error. Raises ConfigError when the points cannot answer."""
    from libinfer.lab import cost as costs
    from libinfer.lab import predictor
    records = lab_records(points)
    if not records:
        raise ConfigError("mlflow.experiment", f"no lab runs (single/multi points) to fit; run jobs.benchmark "
                                               f"first, e.g.: {BENCHMARK_HINT}")
    (dev, dt, tp), group = fit_group(records, device, dtype, tp_size)
    elem = int(float(group[0].get("dtype_bytes") or 4))
    shape, shape_from = model_shape(model, records, elem)
    lat = predictor.fit(group, "latency")
    mem = predictor.fit(group, "memory") if all("peak_memory_bytes" in r for r in group) else None
    ho = predictor.evaluate_heldout(group, "latency")
    n = int(math.ceil(prompts))

    def hours(k: int) -> float:
        return lat.predict(workload(shape, model, k, prompt_tokens, out_tokens, batch_size, tp)) / 3600

    one = hours(n)
    executors = max(1, math.ceil(one / deadline_h))
    one_batch = hours(min(batch_size, n))
    feasible = one_batch <= deadline_h
    if feasible:
        while hours(math.ceil(n / executors)) > deadline_h:    # whole batches: a share can round up
            executors += 1
    each = hours(math.ceil(n / executors))
    threads = Counter(int(float(r.get("threads") or 1)) for r in group).most_common(1)[0][0]
    cost_cfg = cost if cost is not None else CostConf()
    kind = costs.kind_of(cost_cfg, dev)
    units = tp if kind != "cpu" else threads
    rate = costs.executor_price(cost_cfg, kind, units)
    lab_batches = sorted({int(float(r["batch_size"])) for r in group})
    lab_params = sorted({float(r["n_params"]) for r in group})
    names = {r["model"]: float(r["n_params"]) for r in group}
    out = {
        "prompts": n, "prompt_tokens": prompt_tokens, "out_tokens": out_tokens, "model": model,
        "n_params": shape["n_params"], "shape_from": shape_from, "device": dev, "dtype": dt, "tp_size": tp,
        "batch_size": batch_size, "deadline_h": deadline_h, "threads": threads,
        "device_name": Counter(str(r.get("device_name", "")) for r in group).most_common(1)[0][0],
        "one_executor_h": one, "one_batch_h": one_batch, "feasible": feasible, "executors": executors,
        "hours": each, "prompts_per_executor": math.ceil(n / executors),
        "kind": kind, "units": units, "usd_per_executor_hour": rate, "cost_usd": executors * each * rate,
        "generated_tokens": n * out_tokens,
        "peak_memory_bytes": mem.predict(workload(shape, model, batch_size, prompt_tokens, out_tokens, batch_size, tp))
        if mem else float("nan"),
        "n_runs": len(group), "models": dict(sorted(names.items(), key=lambda kv: kv[1])),
        "heldout_model": ho.held_out_model, "heldout_runs": len(ho.rows), "heldout_mape": ho.heldout_mape,
        "heldout_max_err": ho.heldout_max_err, "train_mape": lat.train_mape,
        "extrapolated": [w for w, bad in (
            (f"batch {batch_size} (lab: {lab_batches[0]}-{lab_batches[-1]})",
             not lab_batches[0] <= batch_size <= lab_batches[-1]),
            (f"{shape['n_params'] / 1e6:.0f}M params (lab: {lab_params[0] / 1e6:.0f}M-{lab_params[-1] / 1e6:.0f}M)",
             not lab_params[0] <= shape["n_params"] <= lab_params[-1] * 1.01)) if bad],
    }
    out["cost_per_1m_prompts_usd"] = out["cost_usd"] / n * 1e6
    out["cost_per_1m_generated_tokens_usd"] = out["cost_usd"] / out["generated_tokens"] * 1e6
    return out


def answer_lines(p: dict) -> list[str]:
    unit = "vCPU" if p["kind"] == "cpu" else "GPU"
    lines = [f"plan: {p['prompts']:,} prompts x ({p['prompt_tokens']} prompt + {p['out_tokens']} generated tokens) "
             f"on {p['model']} ({p['n_params'] / 1e6:.0f}M params), {p['device']} {p['dtype']} tp{p['tp_size']}, "
             f"batches of {p['batch_size']}, deadline {p['deadline_h']:g} h"]
    if not p["feasible"]:
        lines.append(f"  cannot meet the deadline: one batch of {p['batch_size']} alone is predicted to take "
                     f"{p['one_batch_h']:.3g} h; lower batch_size, use a faster device or a larger tp_size")
    lines += [
        f"  executors: {p['executors']}  (one executor = {p['threads'] if p['kind'] == 'cpu' else p['tp_size']} "
        f"{unit}(s) as the lab ran it: {p['device_name'] or p['device']})",
        f"  hours:     {p['hours']:.3g} h each for {p['prompts_per_executor']:,} prompts "
        f"(one executor alone: {p['one_executor_h']:.3g} h)",
        f"  cost:      ${p['cost_usd']:,.2f} = {p['executors']} x {p['hours']:.3g} h x ${p['usd_per_executor_hour']:.4g}/h "
        f"({p['kind']}: {p['units']:g} {unit}(s)); ${p['cost_per_1m_prompts_usd']:,.2f} per 1M prompts, "
        f"${p['cost_per_1m_generated_tokens_usd']:,.3f} per 1M generated tokens",
        f"  error:     held-out {p['heldout_model']} ({p['heldout_runs']} runs, fitted on the smaller models only): "
        f"mean {100 * p['heldout_mape']:.1f}%, max {100 * p['heldout_max_err']:.1f}% on latency; "
        f"in-sample {100 * p['train_mape']:.1f}% over {p['n_runs']} runs of "
        + ", ".join(f"{m} ({v / 1e6:.0f}M)" for m, v in p["models"].items()),
    ]
    if p["peak_memory_bytes"] == p["peak_memory_bytes"]:
        lines.append(f"  memory:    {p['peak_memory_bytes'] / 2**30:.2f} GiB peak per executor predicted")
    if p["extrapolated"]:
        lines.append("  note:      extrapolating beyond the lab's runs in " + "; ".join(p["extrapolated"])
                     + " (the held-out error above is the best guide to how far that holds)")
    lines.append(f"  model shape from {p['shape_from']}")
    return lines


def run(cfg) -> dict:
    from jobs.report import load_points
    validate(cfg)
    try:
        points, _ = load_points(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.sweep)
    except ConfigError as e:
        if e.key != "mlflow.experiment":
            raise
        raise ConfigError("mlflow.experiment", f"no experiment {cfg.mlflow.experiment!r} in "
                                               f"{cfg.mlflow.tracking_uri}: run jobs.benchmark first, e.g.: "
                                               f"{BENCHMARK_HINT}") from None
    p = plan(points, cfg.prompts, cfg.prompt_tokens, cfg.out_tokens, cfg.model, cfg.device, cfg.deadline_h,
             cfg.batch_size, cfg.dtype, cfg.tp_size, cfg.cost)
    print("\n".join(answer_lines(p)), flush=True)
    return p


@hydra.main(config_path="../conf/plan", config_name="plan", version_base=None)
@entry_point
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
