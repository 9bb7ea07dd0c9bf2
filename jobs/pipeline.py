"""jobs.pipeline: preprocess and generate in one command (the README's demo).

    python -m jobs.pipeline data.path=IN.jsonl out=DIR2 generation=test1
    spark-submit jobs/pipeline.py data.path=IN.jsonl out=DIR2 generation=test1

Writes DIR2/clustered/ (the prompts clustered by prefix family and length), DIR2/results/
and DIR2/quarantine/ (with data.format=openai_batch also DIR2/openai/output.jsonl and
errors.jsonl, see jobs/_batchfile.py); logs one MLflow run with both stages' metrics (`preprocess.*`,
`generate.*`). With resume=true a finished clustered/ is reused and ids already in results
are skipped.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/pipeline.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import time

import hydra

from jobs import _config
from jobs._spark import Output, entry_point, prepare_output, progress


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
    from jobs.generate import log_generate, run_generate
    from jobs.preprocess import log_preprocess, run_preprocess
    from jobs.preprocess import check_local_path
    _config.validate(cfg)
    check_local_path("data.path", cfg.data.path)
    t0 = time.perf_counter()
    spark = session(cfg, " pipeline")
    out = Output(spark, cfg.out)
    reuse = cfg.resume and out.complete("clustered")
    if not reuse:
        # A resumed run whose preprocess did not finish starts over: ids were never handed out.
        prepare_output(out, ["clustered", "quarantine", "results"], resume=False,
                       overwrite=cfg.overwrite or (cfg.resume and not out.has_data("results")))
    with mlflow_run(cfg, "pipeline") as run:
        pre = None
        if reuse:
            progress(f"pipeline: reusing {out.path('clustered')} (resume=true)")
            prepare_output(out, ["results", "quarantine"], resume=True, overwrite=False)
        else:
            pre = run_preprocess(spark, cfg, out)
        gen = run_generate(spark, cfg, cfg.out, out, resume=cfg.resume)
        wall = time.perf_counter() - t0
        if run is not None:
            if pre:
                log_preprocess(pre, prefix="preprocess.")
            log_generate(gen, prefix="generate.")
            log_metrics({"wall_s": wall})
        print("\n".join(["", f"pipeline done in {wall:.1f}s", *summary_lines(pre, gen, out, run)]), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
