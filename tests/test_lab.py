"""The performance lab: OOM search, predictor, and a small sweep end to end (jobs.benchmark
-> MLflow -> jobs.report) on tiny random models."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import JOB_ROOT

from libinfer.lab.oom import (Boundary, Probe, boundaries_from_records, memory_probe, oom_table_csv,
                              oom_table_markdown, search_max_batch)


# ----------------------------------------------------------------- OOM search

@pytest.mark.parametrize("base,per,budget,limit", [
    (100, 7, 100 + 7 * 37 + 3, 4096),    # boundary 37: between powers of two
    (100, 7, 100 + 7 * 64, 4096),        # exactly a power of two
    (100, 7, 100 + 7 * 1, 4096),         # only batch 1
    (100, 7, 99, 4096),                  # not even batch 1
    (100, 7, 10**9, 50),                 # never fails: capped at the limit
])
def test_search_finds_the_boundary_a_budget_implies(base, per, budget, limit):
    calls = []

    def measure(b):
        calls.append(b)
        return {"peak_memory_bytes": base + per * b, "wall_s": 0.01 * b}

    bd = search_max_batch(memory_probe(measure, budget), limit=limit)
    expect = min(max(0, (budget - base) // per), limit)
    assert bd.max_batch == expect
    assert len(calls) == len(set(calls))                      # never probes twice
    assert len(calls) <= 2 * math.ceil(math.log2(max(expect, 1) + 1)) + 2
    assert all(p.fits == (base + per * b <= budget) for b, p in bd.probes.items())
    if expect < limit:
        assert not bd.capped and bd.probes[expect + 1].fits is False
    else:
        assert bd.capped


def test_real_oom_is_caught_and_other_errors_are_not():
    def measure(b):
        if b >= 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"peak_memory_bytes": 1}

    bd = search_max_batch(memory_probe(measure, None))
    assert bd.max_batch == 7 and "OutOfMemoryError" in bd.probes[8].reason

    def broken(b):
        raise ValueError("a bug, not an OOM")
    with pytest.raises(ValueError):
        search_max_batch(memory_probe(broken, None))


def test_oom_table_has_the_talks_shape():
    a = Boundary(5, {b: Probe(b, b <= 5, {"wall_s": 0.1 * b}) for b in (1, 2, 4, 8, 6, 5)})
    c = Boundary(2, {b: Probe(b, b <= 2, {"wall_s": 0.2 * b}) for b in (1, 2, 4, 3)})
    md = oom_table_markdown({"big gpu": a, "small gpu": c})
    lines = md.splitlines()
    assert lines[0] == "| batch | big gpu | small gpu |"
    assert "| 4 | 0.400 | OOM |" in lines                       # c's boundary implies OOM at 4
    assert "| 8 | OOM | OOM |" in lines
    assert "| **max batch** | **5** | **2** |" in lines
    csv = oom_table_csv({"big gpu": a, "small gpu": c})
    assert csv.splitlines()[0] == "batch_size,big gpu,small gpu" and "max_batch,5,2" in csv
    # round trip through flat records (what MLflow gives back)
    recs = [{"oom_column": "big gpu", "batch_size": str(b), "fits": float(p.fits), **p.metrics}
            for b, p in a.probes.items()]
    assert boundaries_from_records(recs)["big gpu"].max_batch == 5


# ------------------------------------------------------------------ predictor

def _record(model, P, layers, b, lin, lout):
    return {"model": model, "n_params": P, "n_layers": layers, "hidden_size": 64 * layers, "intermediate_size": 256,
            "vocab_size": 1000, "kv_bytes_per_token": 512 * layers, "weight_bytes": 4 * P, "dtype_bytes": 4,
            "input_tokens": lin, "output_tokens": lout, "batch_size": b, "n_prompts": b, "tp_size": 1}


def test_predictor_recovers_a_known_model_and_extrapolates():
    from libinfer.lab import predictor
    true_lat = [0.01, 1 / 100e9, 0, 20e-6, 1 / 30e9, 1 / 200e9, 1 / 10e9]
    true_mem = [300 * 2**20, 1.0, 1.0, 2.0]
    recs = []
    for m, (P, L) in {"s": (30e6, 6), "m": (60e6, 10), "l": (120e6, 16), "xl": (240e6, 24)}.items():
        for b in (1, 4, 16):
            for lin, lout in ((32, 8), (128, 32), (256, 16)):
                r = _record(m, P, L, b, lin, lout)
                r["wall_s"] = float(sum(c * f for c, f in zip(true_lat, predictor.latency_features(r))))
                r["peak_memory_bytes"] = float(sum(c * f for c, f in zip(true_mem, predictor.memory_features(r))))
                recs.append(r)
    for target in ("latency", "memory"):
        ho = predictor.evaluate_heldout(recs, target)
        assert ho.held_out_model == "xl" and len(ho.rows) == 9
        assert ho.heldout_mape < 0.01, (target, ho.heldout_mape)
    fit = predictor.fit(recs, "latency")
    assert "GB/s" in fit.explain()["decode_weight_byte"]


# ------------------------------------------------------------- the lab, end to end

def _cfg(tmp, *overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(JOB_ROOT, "conf"), version_base=None):
        return compose("benchmark", overrides=[f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                                               "mlflow.experiment=lab", "sweep=ci", "threads=1", *overrides])


def _model(tmp, name, layers):
    return [f"model.name={name}", f"model.path={tmp}/{name}", f"model.random_init.n_layers={layers}"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A small sweep: two model sizes x single, one multi and three OOM searches."""
    from jobs import benchmark
    from libinfer import ModelConfig
    from libinfer.lab.random_model import llama_config
    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("lab")
    small, big = _model(tmp, "tiny_a", 1), _model(tmp, "tiny_b", 4)
    out = {"tmp": tmp}
    for m in (small, big):
        out.setdefault("single", []).extend(benchmark.run(_cfg(tmp, "mode=single", "workload.input_tokens=[8,24]",
                                                               "workload.output_tokens=[2,6]", *m)))
    out["multi"] = benchmark.run(_cfg(tmp, "mode=multi", "workload.input_tokens=[16]", "workload.output_tokens=[3]",
                                      "workload.batch_size=[1,4]", "workload.sorted=[false,true]",
                                      "workload.pad_to_longest=[false,true]", "workload.input_spread=0.8",
                                      "workload.n_prompts=8", *small))
    out["replay"] = benchmark.run(_cfg(tmp, "mode=replay", "replay.via=libinfer", "replay.limit=8",
                                       "replay.batch_size=[4]", "generation=test1", *small))
    # Synthetic budget on the (deterministic) KV-cache size: room for exactly 37.5 rows.
    kv_row = ModelConfig.from_hf(llama_config(hidden_size=128, n_layers=1, n_heads=4, n_kv_heads=2,
                                              intermediate_size=256)).kv_bytes_per_token(torch.float32) * 64
    out["kv_row"] = kv_row
    out["oom"] = benchmark.run(_cfg(tmp, "mode=oom", "oom.metric=kv_cache_bytes", f"oom.budget_gb={37.5 * kv_row / 2**30}",
                                    "oom.input_tokens=[10]", "oom.output_tokens=[2]", "oom.max_batch=256", *small))
    # Measured peak memory (RSS): a budget below the process itself fits nothing; a generous
    # one (this process's RSS, which other tests' models inflate in a full run, + 1.5 GiB)
    # fits everything up to the limit.
    from libinfer.metrics import rss_bytes
    generous = round(rss_bytes() / 2**30 + 1.5, 2)
    benchmark.run(_cfg(tmp, "mode=oom", "oom.budget_gb=0.001", "oom.input_tokens=[4]", "oom.output_tokens=[2]", *big))
    benchmark.run(_cfg(tmp, "mode=oom", f"oom.budget_gb={generous}", "oom.input_tokens=[6]", "oom.output_tokens=[2]",
                       "oom.max_batch=4", *big))
    torch.set_num_threads(threads)
    return out


def test_every_point_is_a_nested_run_with_the_speed_metrics(lab):
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{lab['tmp']}/mlflow.db")
    exp = mlflow.get_experiment_by_name("lab")
    parents = mlflow.search_runs([exp.experiment_id], "tags.`lab.role` = 'sweep'", output_format="list")
    assert len(parents) == 1 and parents[0].info.run_name == "ci"
    points = mlflow.search_runs([exp.experiment_id], "tags.`lab.role` = 'point'", output_format="list")
    assert len(points) == 8 + 8 + 2 + len(lab["oom"]) + 1 + 3
    assert {p.data.tags["mlflow.parentRunId"] for p in points} == {parents[0].info.run_id}
    for p in points:
        if p.data.params["mode"] in ("single", "multi"):
            for k in ("ttft_s", "tpot_s", "e2e_latency_s", "wall_s", "tokens_per_s", "peak_memory_bytes",
                      "padding_waste", "point_warmup_s"):
                assert k in p.data.metrics, k
            assert p.data.metrics["exact_lengths"] == 1.0       # ignore_eos: exactly what was asked
    loads = [p for p in points if "model_load_s" in p.data.metrics]
    assert loads and all("model_warmup_s" in p.data.metrics for p in loads)
    single = lab["single"]
    assert len({r["n_params"] for r in single}) == 2
    # exactly the asked lengths: one prefill, then output-1 decode steps (timings of a tiny
    # model are too small to compare on a shared machine)
    for r in single:
        assert r["generated_tokens"] == r["output_tokens"] and r["decode_steps"] == r["output_tokens"] - 1
        assert r["prompt_tokens"] == r["input_tokens"] and 0 < r["ttft_s"] <= r["wall_s"]


def test_sorting_and_padding_are_measured(lab):
    m = {(r["batch_size"], r["sorted"], r["pad_to_longest"]): r for r in lab["multi"]}
    # batch 1 has nothing to pad; in batches of 4, sorting by length cuts the padding
    assert m[(1, False, True)]["prefill_padding"] == 0 and m[(1, False, False)]["padding_waste"] == 0
    assert m[(4, True, True)]["prefill_padding"] < m[(4, False, True)]["prefill_padding"]
    assert m[(4, True, False)]["padding_waste"] < m[(4, False, False)]["padding_waste"]
    assert m[(4, False, False)]["prefill_padding"] == 0       # our engine packs prompts: no prefill padding
    assert m[(4, False, True)]["prompt_tokens"] > m[(4, False, False)]["prompt_tokens"]
    rp = {r["sorted"]: r for r in lab["replay"]}
    assert rp[True]["n_prompts"] == rp[False]["n_prompts"] == 8 and rp[True]["prompt_tokens"] == rp[False]["prompt_tokens"]
    assert rp[True]["padding_waste"] < rp[False]["padding_waste"]


def test_oom_search_finds_the_synthetic_budgets_boundary(lab):
    import mlflow
    fits = {r["batch_size"]: r["fits"] for r in lab["oom"]}
    assert fits[37] == 1.0 and fits[38] == 0.0
    assert max(b for b, f in fits.items() if f) == 37
    assert all(r["kv_cache_bytes"] == r["batch_size"] * lab["kv_row"] for r in lab["oom"] if r["fits"])
    mlflow.set_tracking_uri(f"sqlite:///{lab['tmp']}/mlflow.db")
    exp = mlflow.get_experiment_by_name("lab")
    parent = mlflow.search_runs([exp.experiment_id], "tags.`lab.role` = 'sweep'", output_format="list")[0]
    md = open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="lab/oom_table.md")).read()
    header = md.splitlines()[2]
    assert "tiny_a cpu float32 tp1 in10 out2" in header and "tiny_b cpu float32 tp1 in4 out2" in header
    row = [ln for ln in md.splitlines() if ln.startswith("| **max batch**")][0]
    assert "**37**" in row and "**0**" in row and "**>=4**" in row


def test_report_writes_figures_tables_and_predictor(lab, tmp_path):
    from hydra import compose, initialize_config_dir
    from jobs import report
    with initialize_config_dir(config_dir=os.path.join(JOB_ROOT, "conf"), version_base=None):
        cfg = compose("report", overrides=[f"mlflow.tracking_uri=sqlite:///{lab['tmp']}/mlflow.db",
                                           "mlflow.experiment=lab", "sweep=ci", f"out={tmp_path}/rep",
                                           "baseline=tiny_a", "predictor.predict_sizes=[llama_35m]",
                                           "predictor.workloads=['16,4,1']"])
    metrics = report.run(cfg)
    rep = tmp_path / "rep"
    for fig in ("latency_vs_output_tokens.png", "memory_vs_tokens_x_batch.png", "time_vs_model_size.png",
                "throughput_vs_batch.png", "replay.png"):
        assert (rep / fig).stat().st_size > 5000, fig
    speed = (rep / "speedup.md").read_text()
    assert "tiny_a cpu float32 tp1 = 1" in speed and "| single in24 out6 b1 | 1.00 |" in speed
    assert "**37**" in (rep / "oom_table.md").read_text()
    assert "| replay | tiny_a cpu float32 tp1 | packed |" in (rep / "report.md").read_text()
    pred = (rep / "predictor.md").read_text()
    assert "Held out **tiny_b**" in pred and "llama_35m" in pred
    assert metrics["size_2x_time_ratio"] > 0 and "predictor_latency_heldout_mape" in metrics
    assert (rep / "predictions.csv").read_text().count("\n") == 2


def test_multirun_sweep_shares_one_parent(tmp_path):
    """`-m` runs several jobs in one process; all their points nest under one parent."""
    env = dict(os.environ, LIBINFER_CACHE=str(tmp_path / "cache"), HYDRA_RUN_ROOT=str(tmp_path / "hydra"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "-m", "mode=single", "threads=1",
                           f"model.path={tmp_path}/tiny", "workload.input_tokens=[4]", "workload.output_tokens=[2],[3]",
                           f"mlflow.tracking_uri={uri}", "mlflow.experiment=mr"],
                          cwd=JOB_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[tiny_random single 1/1" in proc.stdout
    import mlflow
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("mr")
    points = mlflow.search_runs([exp.experiment_id], "tags.`lab.role` = 'point'", output_format="list")
    parents = mlflow.search_runs([exp.experiment_id], "tags.`lab.role` = 'sweep'", output_format="list")
    assert len(points) == 2 and len(parents) == 1
    assert {p.data.tags["mlflow.parentRunId"] for p in points} == {parents[0].info.run_id}


def test_bad_config_fails_naming_the_key(tmp_path):
    from jobs import benchmark
    from jobs._config import ConfigError
    with pytest.raises(ConfigError, match="'mode'"):
        benchmark.run(_cfg(tmp_path, "mode=fast"))
    with pytest.raises(ConfigError, match="'oom.budget_gb'"):
        benchmark.run(_cfg(tmp_path, "mode=oom"))
    with pytest.raises(ConfigError, match="'size'"):
        benchmark.run(_cfg(tmp_path, "size=llama_7t"))
