"""An explainable predictor of latency and peak memory, fitted to benchmark runs.

The talk measured so it could plan hardware for model sizes it did not have yet. We fit
two small physical models by non-negative least squares, so every coefficient reads as a
hardware number:

  latency = batches x ( c0                                  fixed cost per batch
                      + c1 * 2 P b Lin / tp                 prefill FLOPs       -> FLOP/s
                      + c2 * 2 layers H b Lin^2 / tp        prefill attention   -> FLOP/s
                      + Lout * ( c3 * layers                per-step, per-layer overhead
                               + c4 * weight_bytes / tp     weights read per step -> bytes/s
                               + c5 * 2 P b / tp            decode FLOPs        -> FLOP/s
                               + c6 * b (Lin + Lout/2) kv/tp ) )  KV read per step -> bytes/s
  memory  = m0 (runtime) + m1 * weight_bytes/tp + m2 * KV cache bytes + m3 * b Lin (4H + 3I) elem/tp

P parameters, b batch, Lin/Lout input/output tokens, H hidden, I intermediate size.
Records are flat dicts (one per run) holding those inputs; see `FEATURES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _inputs(r: dict) -> dict:
    b = float(r["batch_size"])
    n = float(r.get("n_prompts") or b)
    tp = float(r.get("tp_size") or 1)
    lin = float(r.get("mean_prompt_tokens") or r["input_tokens"])
    lin_max = float(r.get("max_prompt_tokens") or lin)
    return dict(b=min(b, n), batches=math.ceil(n / b), tp=tp, lin=lin, lin_max=lin_max, lout=float(r["output_tokens"]),
                P=float(r["n_params"]), L=float(r["n_layers"]), H=float(r["hidden_size"]),
                I=float(r["intermediate_size"]), kv=float(r["kv_bytes_per_token"]),
                W=float(r["weight_bytes"]), e=float(r.get("dtype_bytes") or 4))


def latency_features(r: dict) -> list[float]:
    x = _inputs(r)
    b, tp, lin, lout = x["b"], x["tp"], x["lin"], x["lout"]
    per_batch = [1.0, 2 * x["P"] * b * lin / tp, 2 * x["L"] * x["H"] * b * lin ** 2 / tp,
                 lout * x["L"], lout * x["W"] / tp, lout * 2 * x["P"] * b / tp,
                 lout * b * (lin + lout / 2) * x["kv"] / tp]
    return [x["batches"] * f for f in per_batch]


def memory_features(r: dict) -> list[float]:
    x = _inputs(r)
    slots_len = math.ceil((x["lin_max"] + x["lout"]) / 64) * 64
    return [1.0, x["W"] / x["tp"], x["kv"] * x["b"] * slots_len / x["tp"],
            x["b"] * x["lin_max"] * (4 * x["H"] + 3 * x["I"]) * x["e"] / x["tp"]]


FEATURES = {
    "latency": (latency_features, ["fixed_s", "prefill_flop", "prefill_attn_flop", "step_layer",
                                   "decode_weight_byte", "decode_flop", "decode_kv_byte"]),
    "memory": (memory_features, ["runtime", "weights", "kv_cache", "activations"]),
}


def nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares by an active set (drop the most negative coefficient
    and re-solve) on column-scaled A. Small problems only, which is what we have."""
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    As = A / scale
    active = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(As[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef / scale


@dataclass
class Fit:
    target: str                      # "latency" | "memory"
    coef: np.ndarray
    names: list[str]
    train_mape: float = float("nan")
    n_train: int = 0

    def predict(self, r: dict) -> float:
        f = FEATURES[self.target][0](r)
        return float(np.dot(self.coef, f))

    def explain(self) -> dict[str, str]:
        """The coefficients in hardware units."""
        out = {}
        for name, c in zip(self.names, self.coef):
            if c == 0:
                out[name] = "0 (not needed by the data)"
            elif name.endswith("_flop"):
                out[name] = f"{1 / c / 1e9:.1f} GFLOP/s effective"
            elif name.endswith("_byte"):
                out[name] = f"{1 / c / 1e9:.1f} GB/s effective"
            elif name == "step_layer":
                out[name] = f"{c * 1e6:.1f} us per layer per decode step"
            elif name == "fixed_s":
                out[name] = f"{c * 1e3:.1f} ms per batch"
            elif name == "runtime":
                out[name] = f"{c / 2**20:.0f} MiB"
            else:
                out[name] = f"x{c:.2f}"
        return out


def target_value(r: dict, target: str) -> float:
    return float(r["wall_s"] if target == "latency" else r["peak_memory_bytes"])


def fit(records: list[dict], target: str) -> Fit:
    """Least squares on relative error (rows divided by y), so small and large runs count alike."""
    fn, names = FEATURES[target]
    A = np.array([fn(r) for r in records], dtype=float)
    y = np.array([target_value(r, target) for r in records], dtype=float)
    coef = nnls(A / y[:, None], np.ones_like(y))
    f = Fit(target, coef, names, n_train=len(records))
    f.train_mape = mape(f, records)
    return f


def mape(f: Fit, records: list[dict]) -> float:
    if not records:
        return float("nan")
    errs = [abs(f.predict(r) - target_value(r, f.target)) / target_value(r, f.target) for r in records]
    return float(np.mean(errs))


@dataclass
class HeldOut:
    """Fit on all but the largest model, score on it; then refit on everything."""
    target: str
    held_out_model: str
    heldout_mape: float
    heldout_max_err: float
    train_fit: Fit
    full_fit: Fit
    rows: list[dict] = field(default_factory=list)   # held-out runs: measured vs predicted


def evaluate_heldout(records: list[dict], target: str, model_key: str = "model") -> HeldOut:
    biggest = max(records, key=lambda r: float(r["n_params"]))[model_key]
    train = [r for r in records if r[model_key] != biggest]
    test = [r for r in records if r[model_key] == biggest]
    if not train:
        raise ValueError("held-out evaluation needs runs of at least two model sizes")
    tf = fit(train, target)
    rows = []
    for r in test:
        pred, meas = tf.predict(r), target_value(r, target)
        rows.append({"model": r[model_key], "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"],
                     "batch_size": r["batch_size"], "measured": meas, "predicted": pred,
                     "rel_error": (pred - meas) / meas})
    errs = [abs(x["rel_error"]) for x in rows]
    return HeldOut(target, str(biggest), float(np.mean(errs)), float(np.max(errs)), tf, fit(records, target), rows)
