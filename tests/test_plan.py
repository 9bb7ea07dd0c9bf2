"""jobs.plan, the capacity planner: a few real lab runs of two tiny random models (jobs.benchmark
-> MLflow), then the plan's arithmetic checked against the predictor fitted on the same runs;
the CLI's answer, --help, and the clear error when there are no runs."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import JOB_ROOT


def _compose(name, *overrides):
    from hydra import compose, initialize_config_dir
    import jobs.benchmark, jobs.plan  # noqa: F401 - their schemas
    folder = os.path.join(JOB_ROOT, "conf", "plan" if name == "plan" else "")
    with initialize_config_dir(config_dir=folder, version_base=None):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def lab_runs(tmp_path_factory):
    """Two model sizes (1 and 3 layers), a small multi grid each: 4 points per model."""
    from jobs import benchmark
    tmp = tmp_path_factory.mktemp("plan_lab")
    store = [f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "mlflow.experiment=lab"]
    for name, layers in (("tiny_p1", 1), ("tiny_p3", 3)):
        benchmark.run(_compose("benchmark", *store, "sweep=plan", "threads=1", "mode=multi",
                               f"model.name={name}", f"model.path={tmp}/{name}", f"model.random_init.n_layers={layers}",
                               "workload.input_tokens=[8,24]", "workload.output_tokens=[2,6]",
                               "workload.batch_size=[4]", "workload.n_prompts=8",
                               "workload.warm_each_point=false"))
    return {"tmp": tmp, "store": store}


def test_plan_arithmetic_follows_the_predictor(lab_runs):
    from jobs import plan as plan_job
    from jobs.report import load_points
    from libinfer.lab import predictor
    cfg = _compose("plan", *lab_runs["store"], "prompts=1000000", "prompt_tokens=16", "out_tokens=4",
                   "model=tiny_p3", "deadline_h=1", "batch_size=4")
    points, _ = load_points(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, None)
    recs = [p for p in points if p.get("mode") == "multi"]
    assert len(recs) == 8 and len({p["model"] for p in recs}) == 2
    # The predictor, fitted here on the same runs, and the work of the whole corpus on one executor.
    fit = predictor.fit(recs, "latency")
    big = next(r for r in recs if r["model"] == "tiny_p3")
    shape = {k: big[k] for k in plan_job.SHAPE_KEYS}

    def hours(n):
        return fit.predict(plan_job.workload(shape, "tiny_p3", n, 16, 4, 4, 1)) / 3600

    total = hours(1_000_000)
    assert total > 0
    # A deadline of total/3.5 needs exactly 4 executors (each share is a whole number of batches).
    deadline = total / 3.5
    cfg.deadline_h = deadline
    p = plan_job.run(cfg)
    assert p["one_executor_h"] == pytest.approx(total, rel=1e-9)
    assert p["executors"] == math.ceil(total / deadline) == 4
    assert p["prompts_per_executor"] == 250_000
    assert p["hours"] == pytest.approx(hours(250_000), rel=1e-9) and p["hours"] <= deadline
    # cost = executors x hours x rate, the rate = cost.rates.cpu x the lab's threads (1)
    assert p["usd_per_executor_hour"] == pytest.approx(0.048)
    assert p["cost_usd"] == pytest.approx(4 * p["hours"] * 0.048, rel=1e-9)
    assert p["cost_per_1m_prompts_usd"] == pytest.approx(p["cost_usd"], rel=1e-9)      # 1M prompts exactly
    # the held-out error printed next to it: the larger model predicted from the smaller one
    ho = predictor.evaluate_heldout(recs, "latency")
    assert p["heldout_model"] == "tiny_p3" and p["heldout_mape"] == pytest.approx(ho.heldout_mape)
    # a given price per executor replaces the table; a longer deadline needs fewer executors
    cfg.cost.usd_per_hour = 2.5
    cfg.deadline_h = total * 2
    q = plan_job.run(cfg)
    assert q["executors"] == 1 and q["cost_usd"] == pytest.approx(q["hours"] * 2.5, rel=1e-9)


def test_plan_cli_answers_and_explains(lab_runs, job_env):
    env = job_env["env"]
    p = subprocess.run([sys.executable, "-m", "jobs.plan", *lab_runs["store"], "prompts=2e6", "prompt_tokens=16",
                        "out_tokens=4", "model=tiny_p3", "device=cpu", "deadline_h=0.5"],
                       cwd=JOB_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for word in ("executors:", "hours:", "cost:", "held-out tiny_p3", "2,000,000 prompts"):
        assert word in p.stdout, p.stdout
    h = subprocess.run([sys.executable, "-m", "jobs.plan", "--help"], cwd=JOB_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "deadline_h: ???" in h.stdout and "run jobs.benchmark first" in h.stdout


def test_plan_without_lab_runs_says_run_the_benchmark(lab_runs):
    from jobs import plan as plan_job
    from jobs._config import ConfigError
    args = ["prompts=1000", "prompt_tokens=16", "out_tokens=4", "model=llama_1b", "deadline_h=1"]
    store = lab_runs["store"][0]            # the lab's store, an experiment without runs
    with pytest.raises(ConfigError, match="run jobs.benchmark first.*python -m jobs.benchmark"):
        plan_job.run(_compose("plan", store, "mlflow.experiment=no_lab_here", *args))
    # one model size is not enough for a held-out error
    with pytest.raises(ConfigError, match="two or more model sizes"):
        plan_job.plan([{"mode": "multi", "model": "a", "n_params": 1e6, "wall_s": 1.0, "device": "cpu",
                        "dtype": "float32", "tp_size": 1}], 1000, 16, 4, "a", "cpu", 1.0)
    with pytest.raises(ConfigError, match="prompt_tokens.*required"):
        plan_job.run(_compose("plan", store, "prompts=5"))


# --------------------------------------------------------------------- cost figures

def test_cost_of_a_run_from_its_generate_metrics():
    from conftest import job_cfg
    from jobs.compare import run_cost
    from libinfer.lab import cost
    m = {"rows": 1000, "generated_tokens": 24_000, "wall_s": 1800.0, "workers": 6}
    # local[2]: one executor of 2 vCPUs at the cpu rate; half an hour
    c = cost.job_cost(m, job_cfg("spark=local2"))
    assert (c["cost_executors"], c["cost_usd_per_executor_hour"]) == (1, pytest.approx(2 * 0.048))
    assert c["cost_usd"] == pytest.approx(0.5 * 2 * 0.048)
    assert c["cost_per_1m_prompts_usd"] == pytest.approx(c["cost_usd"] / 1000 * 1e6)
    assert c["cost_per_1m_generated_tokens_usd"] == pytest.approx(c["cost_usd"] / 24_000 * 1e6)
    assert "per 1M prompts" in cost.cost_line(c) and "local master local[2]" in cost.cost_line(c)
    # a GPU cluster, one TP group of 4 GPUs per executor: 6 workers = 6 executors x 4 GPUs x $1
    g = cost.job_cost(m, job_cfg("spark=standalone_gpu", "model.device=cuda", "model.tp_size=4"))
    assert (g["cost_executors"], g["cost_usd_per_executor_hour"], g["cost_usd"]) == (6, 4.0, pytest.approx(12.0))
    # CPU executors of 2 cores running 2-thread tasks; a price and an executor count given
    s = cost.job_cost(m, job_cfg("spark=standalone", "cost.usd_per_hour=0.5"))
    assert (s["cost_executors"], s["cost_usd"]) == (6, pytest.approx(1.5))
    assert cost.job_cost(m, job_cfg("spark=standalone", "cost.executors=2"))["cost_executors"] == 2
    # the pipeline bills its whole wall time
    assert cost.job_cost(m, job_cfg("spark=local2"), wall_s=3600)["cost_usd"] == pytest.approx(2 * 0.048)
    # jobs.compare: a run's logged figures win unless a price is given; unpriced runs are priced
    logged = {"generate.wall_s": 1800.0, "generate.rows": 1000, "generate.generated_tokens": 24_000,
              **{k: v for k, v in cost.as_metrics(c).items()}}
    cc = job_cfg().cost
    assert run_cost(logged, {}, cc)["cost.per_1m_prompts_usd"] == pytest.approx(c["cost_per_1m_prompts_usd"])
    cc.usd_per_hour = 1.0
    assert run_cost(logged, {}, cc)["cost.per_1m_prompts_usd"] == pytest.approx(0.5 / 1000 * 1e6)
    bare = {"generate.wall_s": 3600.0, "generate.rows": 100, "generate.generated_tokens": 400, "generate.workers": 2}
    params = {"spark.master": "local[2]", "spark.executor_instances": "None", "model.device": "cpu"}
    cc.usd_per_hour = None
    assert run_cost(bare, params, cc)["cost.per_1m_generated_tokens_usd"] == pytest.approx(2 * 0.048 / 400 * 1e6)
    assert math.isnan(run_cost({}, {}, cc)["cost.per_1m_prompts_usd"])
