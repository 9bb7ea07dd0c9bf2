"""jobs.pipeline as users run it: `python -m jobs.pipeline ...` on the real SmolLM2 GGUF,
with the results, the printed summary and the MLflow run checked."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import JOB_ROOT, assert_exactly_once

N = 8


@pytest.mark.slow
def test_pipeline_cli_real_model(job_env, tmp_path, smollm2):
    corpus = tmp_path / "in.jsonl"
    lines = sorted((json.loads(l) for l in open(f"{JOB_ROOT}/data/demo_prompts.jsonl")),
                   key=lambda r: len(r["prompt"]))[::20][:N]     # 4 + 4 rows of the two shortest tasks
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = subprocess.run([sys.executable, "-m", "jobs.pipeline", f"data.path={corpus}", f"out={out}",
                        "generation=test1", "model=smollm2_135m", "spark=local2", "data.num_partitions=1",
                        f"mlflow.tracking_uri={uri}", "mlflow.experiment=pipeline-test"],
                       cwd=JOB_ROOT, env=job_env["env"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for text in ("preprocess:", "rows/s", "generated tokens/s", "padding waste", f"results:    {out}/results",
                 "MLflow run", "mlflow ui --backend-store-uri", "cluster_by=prefix: 2 prefix families",
                 "of prompt tokens in shared prefixes", "prompt tokens reused"):
        assert text in p.stdout, text
    # The time breakdown: one line per phase with its share, and the whole process' wall.
    import re
    phases = dict(re.findall(r"^time: (\S+)\s+([0-9.]+)s", p.stdout, re.M))
    for k in ("python_start", "spark_start", "mlflow", "generate.read", "generate.model_load",
              "generate.generate", "generate.write", "generate.commit", "other", "wall"):
        assert k in phases, (k, phases)
    assert any(k.startswith("preprocess") for k in phases)
    assert abs(sum(float(v) for k, v in phases.items() if k != "wall") - float(phases["wall"])) < 0.1

    assert_exactly_once(out, [r["id"] for r in lines])
    res = pd.read_parquet(out / "results").set_index("id")
    assert set(res["finish_reasons"].map(lambda f: f[0])) <= {"stop", "eos", "length"}
    assert res["completions"].map(lambda c: len(c[0].strip()) > 0).mean() > 0.5   # a real model answers

    # The job's rows are the generator's own output for these prompts (greedy test1).
    from libinfer import GenerationParams
    ids = sorted(res.index)[:3]
    want = smollm2.generate([res.loc[i, "prompt"] for i in ids],
                            GenerationParams.preset("test1"))
    assert [res.loc[i, "completions"][0] for i in ids] == [r.outputs[0].text for r in want]

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pipeline-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["generation.top_p"] == "0.8" and run.data.params["model.name"] == "smollm2_135m"
    for k in ("preprocess.rows_per_s", "preprocess.padding_waste", "generate.tokens_per_s", "generate.latency_p95_s",
              "generate.padding_waste", "generate.model_load_s", "generate.peak_memory_bytes", "generate.prefill_s",
              "preprocess.prefix_shared_share", "generate.prefill_tokens", "generate.kv_bytes_per_row",
              "generate.prefix_evictions", "generate.task_attempts", "generate.partitions_recomputed",
              "time.spark_start_s", "time.generate.generate_s", "time.mlflow_s", "time.wall_s"):
        assert k in run.data.metrics, k
    assert run.data.metrics["time.generate.generate_s"] == pytest.approx(float(phases["generate.generate"]), abs=0.01)
    # Two few-shot headers, four rows each: each header is computed once and read three times.
    assert run.data.metrics["preprocess.prefix_families"] == 2
    assert run.data.metrics["generate.prefix_hit_tokens"] > 0
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "preprocess_length_histogram.png", "generate_partitions.json"} <= arts
