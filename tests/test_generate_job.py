"""jobs.generate: results and metrics, the model built once per worker, exactly once under
a task retry, a failed job, and a resumed run; one Spark job per wave, no zero-row files,
the time breakdown."""
from __future__ import annotations

import os

import pandas as pd
import pytest

from conftest import assert_exactly_once, family_corpus, mixed_corpus, read_out, write_jsonl

N = 40


@pytest.fixture(scope="module")
def clustered(spark, tmp_path_factory, job_env):
    """A preprocess output of N mixed-length prompts in 4 partitions (shared, read-only)."""
    from conftest import job_cfg
    from jobs._spark import Output
    from jobs.preprocess import run_preprocess
    root = tmp_path_factory.mktemp("clustered")
    path = write_jsonl(root / "in.jsonl", mixed_corpus(N, seed=1))
    cfg = job_cfg("model=tiny_random", "spark=local2", f"data.path={path}", "data.num_partitions=4",
                  f"out={root / 'pre'}")
    run_preprocess(spark, cfg, Output(spark, cfg.out))
    Output(spark, cfg.out).mark_complete("quarantine")
    return str(root / "pre")


def generate(spark, cfg, resume=False):
    from jobs._spark import Output, prepare_output
    from jobs.generate import run_generate
    out = Output(spark, cfg.out)
    prepare_output(out, ["results", "quarantine"], resume=resume, overwrite=False)
    return run_generate(spark, cfg, cfg["in"], out, resume=resume)


IDS = [f"r{i:03d}" for i in range(N)]


def counting_jobs(spark, fn):
    """(fn(), ids of the Spark jobs it ran): the jobs of a job group set around it."""
    import uuid
    sc = spark.sparkContext
    group = f"test-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, "counted by the test")
    try:
        result = fn()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return result, sc.statusTracker().getJobIdsForGroup(group)


def file_rows(out_dir) -> dict[str, int]:
    """Rows of every Parquet file in results/ and quarantine/."""
    import pyarrow.parquet as pq
    return {f"{d}/{f}": pq.read_metadata(os.path.join(out_dir, d, f)).num_rows
            for d in ("results", "quarantine") if os.path.isdir(os.path.join(out_dir, d))
            for f in os.listdir(os.path.join(out_dir, d)) if not f.startswith(("_", "."))}


def test_generate_results_metrics_and_one_model_per_worker(spark, run_cfg, clustered):
    cfg = run_cfg(f"in={clustered}", "generation=test1", "generation.stop_sequences=[]", "chunk_rows=7")
    m, jobs = counting_jobs(spark, lambda: generate(spark, cfg))
    # One Spark job generates and writes everything (no persist read by three jobs, no count).
    assert len(jobs) == 1, jobs
    res, q = read_out(cfg.out)
    assert_exactly_once(cfg.out, IDS)
    assert len(res) == N and q.empty
    assert set(res.columns) >= {"id", "prompt", "completions", "finish_reasons", "n_prompt_tokens",
                                "n_generated_tokens"}
    assert all(len(c) == 1 and f[0] in ("eos", "length") for c, f in zip(res["completions"], res["finish_reasons"]))
    assert m["rows"] == N and m["generated_tokens"] == res["n_generated_tokens"].sum() > 0
    # 4 partitions on 2 task slots: at most one model per Python worker, reused across tasks.
    assert m["partitions"] == 4 and 1 <= m["model_loads"] <= m["workers"] <= 2
    for k in ("tokens_per_s", "latency_p50_s", "latency_p95_s", "padding_waste", "libinfer_padding_waste",
              "prefill_s", "decode_s", "model_load_s", "peak_memory_bytes", "prefix_hit_tokens", "prefill_tokens",
              "prefix_hit_share", "kv_bytes_per_row", "prefix_evictions"):
        assert m[k] >= 0, k
    assert m["kv_bytes_per_row"] > 0 and m["prefill_tokens"] > 0
    assert {"prefix_hit_tokens", "prefill_tokens"} <= set(m["_partitions"][0])
    assert os.path.exists(f"{cfg.out}/results/_SUCCESS") and not os.path.exists(f"{cfg.out}/_staging")
    # One file per partition that has rows of that kind: 4 results files, no quarantine file.
    assert sorted(file_rows(cfg.out).values()) == sorted(m["_partitions"][i]["rows"] for i in range(4))
    assert m["task_attempts"] == 4 and m["task_attempts_retried"] == 0 == m["partitions_recomputed"]
    t = m["_breakdown"]
    assert {"read", "model_load", "generate", "write", "commit"} <= set(t) and min(t.values()) >= 0
    assert 0 < t["generate"] <= m["wall_s"]   # model_load is 0 where an earlier test loaded it
    from jobs._spark import Breakdown
    lines = Breakdown(t).lines(m["wall_s"] + 1)
    assert len(lines) == len(t) + 2 and lines[-2].startswith("time: other") and "%" in lines[0]

    # Same rows as the generator itself gives on the same token ids (greedy: deterministic).
    from jobs._model import build_generator
    from jobs._config import generation_params
    gen = build_generator(cfg.model, warmup=False)
    pre = pd.read_parquet(f"{clustered}/clustered").set_index("id")
    some = sorted(res["id"])[:6]
    want = gen.generate([list(pre.loc[i, "token_ids"]) for i in some], generation_params(cfg.generation))
    got = res.set_index("id")
    assert [list(got.loc[i, "completions"]) for i in some] == [[o.text for o in r.outputs] for r in want]


def test_task_retry_is_exactly_once(spark, run_cfg, clustered):
    cfg = run_cfg(f"in={clustered}", "fault.fail_partition=1", "fault.attempts=1", "waves=2")
    m, jobs = counting_jobs(spark, lambda: generate(spark, cfg))
    assert len(jobs) == 2, jobs          # one job per wave
    # The failed first attempt of partition 1 is counted, though the attempt that wrote is the 2nd.
    assert m["task_attempts"] == 5 and m["task_attempts_retried"] == 1 and m["partitions_recomputed"] == 1
    assert_exactly_once(cfg.out, IDS)
    assert len(file_rows(cfg.out)) == 4 and min(file_rows(cfg.out).values()) > 0


def test_failed_job_leaves_no_partial_output(spark, run_cfg, clustered):
    cfg = run_cfg(f"in={clustered}", "fault.fail_partition=2", "fault.attempts=99")
    with pytest.raises(Exception, match="injected fault"):
        generate(spark, cfg)
    res, _ = read_out(cfg.out)
    assert res.empty and not os.path.exists(f"{cfg.out}/results/_SUCCESS")
    assert not os.path.exists(f"{cfg.out}/_staging")


def test_resume_after_a_crash_finishes_exactly_once(spark, run_cfg, clustered):
    # waves=2: the first half of the partitions is committed, then partition 3 fails for good.
    cfg = run_cfg(f"in={clustered}", "waves=2", "fault.fail_partition=3", "fault.attempts=99")
    with pytest.raises(Exception, match="injected fault"):
        generate(spark, cfg)
    half, _ = read_out(cfg.out)
    assert 0 < len(half) < N and half["id"].is_unique
    first_files = set(os.listdir(f"{cfg.out}/results"))

    # Without resume=true the job refuses to mix into it.
    from jobs._spark import JobError
    with pytest.raises(JobError, match="resume=true"):
        generate(spark, run_cfg(f"in={clustered}"))

    m = generate(spark, run_cfg(f"in={clustered}", "resume=true", "waves=2"), resume=True)
    assert m["rows"] == N - len(half)
    assert first_files <= set(os.listdir(f"{cfg.out}/results"))   # the committed half is kept as is
    assert_exactly_once(cfg.out, IDS)
    # The first wave's partitions are empty in the resumed run: no files for them.
    files = file_rows(cfg.out)
    assert min(files.values()) > 0 and len(files) == 4, files
    # Resuming a finished output does nothing, writes nothing and stays exactly once.
    assert generate(spark, run_cfg(f"in={clustered}", "resume=true"), resume=True)["rows"] == 0
    assert_exactly_once(cfg.out, IDS)
    assert file_rows(cfg.out) == files


def test_prompt_over_context_with_output_goes_to_quarantine(spark, run_cfg, clustered):
    # tiny_random's context is 2048: out_seq_length 1900 leaves no room for the longer prompts.
    cfg = run_cfg(f"in={clustered}", "generation.out_seq_length=1900", "generation.ignore_eos=false",
                  "generation.stop_sequences=[]", "fault.fail_partition=-1")
    pre = pd.read_parquet(f"{clustered}/clustered")
    long_ids = set(pre.loc[pre["n_tokens"] + 1900 > 2048, "id"])
    assert long_ids
    # only the over-long prompts: generate on a filtered copy keeps the test fast
    sub = os.path.join(os.path.dirname(cfg.out), "sub")
    os.makedirs(f"{sub}/clustered")
    pre[pre["id"].isin(long_ids)].to_parquet(f"{sub}/clustered/part-0.parquet")
    open(f"{sub}/clustered/_SUCCESS", "w").close()
    cfg = run_cfg(f"in={sub}", "generation.out_seq_length=1900")
    generate(spark, cfg)
    res, q = read_out(cfg.out)
    assert res.empty and set(q["id"]) == long_ids
    assert all(r.startswith("prompt too long") for r in q["reason"]) and set(q["stage"]) == {"generate"}


def test_prefix_cache_on_and_off_on_prefix_families(spark, run_cfg, tmp_path):
    """A few-shot corpus clustered by prefix: the shared headers are read from the cache
    (model.prefix_cache=true, the default), recomputed with it off, same completions."""
    from jobs._spark import Output
    from jobs._tracking import mlflow_run
    from jobs.generate import log_generate
    from jobs.preprocess import run_preprocess
    rows = family_corpus(24, seed=5)
    pre = run_cfg(f"data.path={write_jsonl(tmp_path / 'in.jsonl', rows)}", "data.num_partitions=2",
                  f"out={tmp_path / 'pre'}")
    run_preprocess(spark, pre, Output(spark, pre.out))
    Output(spark, pre.out).mark_complete("quarantine")
    got = {}
    for on in (True, False):
        cfg = run_cfg(f"in={pre.out}", f"out={tmp_path / str(on)}", "generation=test1", "generation.stop_sequences=[]",
                      "generation.out_seq_length=4", f"model.prefix_cache={str(on).lower()}",
                      f"mlflow.experiment=prefix-cache-{on}-{os.getpid()}")
        with mlflow_run(cfg, "generate") as run:
            m = generate(spark, cfg)
            log_generate(m)
        assert_exactly_once(cfg.out, [r["id"] for r in rows])
        res, _ = read_out(cfg.out)
        got[on] = (m, dict(zip(res["id"], res["completions"].map(list))), run.info.run_id)
    (on, res_on, run_on), (off, res_off, _) = got[True], got[False]
    assert res_on == res_off
    assert on["prompt_tokens"] == off["prompt_tokens"] > 0
    assert on["prefix_hit_tokens"] > 0 and off["prefix_hit_tokens"] == 0
    assert on["prefill_tokens"] < off["prefill_tokens"]
    assert on["prefix_hit_share"] == on["prefix_hit_tokens"] / on["prompt_tokens"]
    assert 0 < on["kv_bytes_per_row"] < off["kv_bytes_per_row"]
    import mlflow
    logged = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(run_on).data.metrics
    for k in ("prefix_hit_tokens", "prefill_tokens", "kv_bytes_per_row", "prefix_evictions", "prefix_hit_share"):
        assert logged[k] == on[k], k
