"""jobs.pipeline: preprocess and generate in one command (the README's demo).

    python -m jobs.pipeline data.path=IN.jsonl out=DIR2 generation=test1
    spark-submit jobs/pipeline.py data.path=IN.jsonl out=DIR2 generation=test1

Writes DIR2/clustered/ (the prompts clustered by prefix family and length), DIR2/results/
and DIR2/quarantine/ (with data.format=openai_batch also DIR2/openai/output.jsonl and
errors.jsonl, see jobs/_batchfile.py); logs one MLflow run with both stages' metrics (`preprocess.*`,
`generate.*`). With resume=true a finished clustered/ is reused and ids already in results
are skipped. At the end it prints where the process' wall time went (Python start, Spark
start, preprocess' phases, generate's read / model load / generate / write / commit, MLflow),
one line per phase with its share, also logged as `time.<phase>_s`.

Generate takes the clustered data from the files preprocess has just committed: each file is
one cluster and one partition (`spark.sql.files.openCostInBytes`), so reading them is the
hand-over that keeps the clusters' partitioning; the in-memory DataFrame would recompute
preprocess. Reading them is a file listing and one footer on the driver, no Spark job.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/pipeline.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import time

import hydra

from jobs import _config
from jobs._spark import Breakdown, Output, entry_point, prepare_output, process_age_s, progress


def summary_lines(pre: dict | None, gen: dict, out: Output, run) -> list[str]:
    from jobs.generate import prefix_cache_line
    lines = []
    if pre:
        from jobs.preprocess import padding_line, prefix_line
        lines.append(f"preprocess: {pre['rows_in']} rows in {pre['wall_s']:.1f}s = {pre['rows_per_s']:.1f} rows/s; "
                     f"{pre['rows_quarantined']} quarantined; cluster_by={pre['cluster_by']}: {prefix_line(pre)}; "
                     f"{padding_line(pre)}")
    lines.append(f"generate:   {gen['rows']} rows, {gen['generated_tokens']} tokens in {gen['wall_s']:.1f}s = "
                 f"{gen.get('tokens_per_s', 0):.1f} generated tokens/s, {gen.get('rows_per_s', 0):.2f} rows/s; "
                 f"latency p50 {gen.get('latency_p50_s', 0):.2f}s p95 {gen.get('latency_p95_s', 0):.2f}s; "
                 f"padding waste {100 * gen.get('padding_waste', 0):.1f}% (decode attention "
                 f"{100 * gen.get('libinfer_padding_waste', 0):.1f}%)")
    lines.append(f"            {prefix_cache_line(gen)}")
    lines.append(f"results:    {out.path('results')}")
    lines.append(f"quarantine: {out.path('quarantine')}")
    if "openai_output_lines" in gen:
        lines.append(f"openai:     {out.path('openai', 'output.jsonl')} ({gen['openai_output_lines']} lines), "
                     f"{out.path('openai', 'errors.jsonl')} ({gen['openai_error_lines']} lines)")
    if run is not None:
        from jobs._tracking import run_url
        lines.append(run_url(run))
    return lines


@hydra.main(config_path="../conf", config_name="config", version_base=None)
@entry_point
def main(cfg) -> None:
    from jobs._spark import session
    from jobs._tracking import log_metrics, mlflow_run
    from libinfer.lab.cost import as_metrics, cost_line, job_cost
    from jobs.generate import log_generate, run_generate
    from jobs.preprocess import log_preprocess, run_preprocess
    from jobs.preprocess import check_local_path
    t0 = time.perf_counter()
    times = Breakdown({"python_start": process_age_s()})    # interpreter, imports, Hydra
    _config.validate(cfg)
    check_local_path("data.path", cfg.data.path)
    with times.phase("spark_start"):
        spark = session(cfg, " pipeline")
        out = Output(spark, cfg.out)
        reuse = cfg.resume and out.complete("clustered")
        if not reuse:
            # A resumed run whose preprocess did not finish starts over: ids were never handed out.
            prepare_output(out, ["clustered", "quarantine", "results"], resume=False,
                           overwrite=cfg.overwrite or (cfg.resume and not out.has_data("results")))
    mlflow_t0 = time.perf_counter()
    with mlflow_run(cfg, "pipeline") as run:
        times.add("mlflow", time.perf_counter() - mlflow_t0)
        pre = None
        if reuse:
            progress(f"pipeline: reusing {out.path('clustered')} (resume=true)")
            prepare_output(out, ["results", "quarantine"], resume=True, overwrite=False)
        else:
            pre_t0 = time.perf_counter()
            pre = run_preprocess(spark, cfg, out)
            pre_s = time.perf_counter() - pre_t0
            phases = pre.get("_breakdown") or {}
            times.update(phases, prefix="preprocess.")
            if sum(phases.values()) < pre_s:      # what preprocess' own phases do not cover
                times.add("preprocess" + (".other" if phases else ""), pre_s - sum(phases.values()))
        gen = run_generate(spark, cfg, cfg.out, out, resume=cfg.resume)
        times.update(gen["_breakdown"], prefix="generate.")
        mlflow_t0 = time.perf_counter()
        if run is not None:
            if pre:
                log_preprocess(pre, prefix="preprocess.")
            log_generate(gen, prefix="generate.")
        times.add("mlflow", time.perf_counter() - mlflow_t0)
        wall = times.phases["python_start"] + time.perf_counter() - t0
        cost = job_cost(gen, cfg, wall_s=wall)         # the whole process holds the executors
        if run is not None:
            log_metrics({"wall_s": wall, **times.metrics(wall), **as_metrics(cost)})
        print("\n".join(["", f"pipeline done in {wall:.1f}s (whole process)", *summary_lines(pre, gen, out, run),
                         cost_line(cost),
                         *times.lines(wall)]), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
