"""jobs.generate: run our generator over the prefix- and length-clustered partitions.

    python -m jobs.generate in=DIR out=DIR2 generation=test1 model=smollm2_135m

Reads DIR/clustered/ (written by jobs.preprocess). Each Python worker builds the model
once and keeps it for every later task (like predict_batch_udf); each partition is fed
to it in its stored order (one prompt family after the other, sorted by length), `chunk_rows`
rows per call; the generator batches neighbouring lengths under its token budget and keeps a
family's shared header in its prefix cache across calls. Writes DIR2/results/ (id, prompt,
completions, finish_reasons, n_prompt_tokens, n_generated_tokens) and DIR2/quarantine/
(id, row, stage, reason, raw; preprocess' quarantine is carried over), then `_SUCCESS`.
Output is deterministic (greedy, or seeded per prompt), so a retried task or a resumed
run regenerates identical rows.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/generate.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import dataclasses
import json
import os
import random
import time
import uuid

import hydra

from jobs import _config
from jobs._spark import (Breakdown, JobError, Output, batch_padding, entry_point, maybe_fail, prepare_output,
                         process_age_s, progress, waste)

# What a generate task returns to the driver: one row per file it wrote (kind "result" or
# "quarantine", its URI and rows) and one "metrics" row. The rows themselves never go
# through Spark: the task writes them as Parquet under the wave's staging directory.
MANIFEST_SCHEMA = "kind string, path string, rows long, metrics string"
RESULT_COLUMNS = ["id", "prompt", "completions", "finish_reasons", "n_prompt_tokens", "n_generated_tokens"]
INPUT_COLUMNS = ["id", "text", "token_ids", "n_tokens", "row"]


def file_schemas(batch_file: bool) -> dict:
    """The Parquet schemas of results/ and generate's quarantine/ files (an OpenAI batch
    file's rows add row + response, and error)."""
    import pyarrow as pa
    res = [("id", pa.string()), ("prompt", pa.string()), ("completions", pa.list_(pa.string())),
           ("finish_reasons", pa.list_(pa.string())), ("n_prompt_tokens", pa.int32()),
           ("n_generated_tokens", pa.int32())]
    q = [("id", pa.string()), ("row", pa.int64()), ("stage", pa.string()), ("reason", pa.string()),
         ("raw", pa.string())]
    if batch_file:
        res += [("row", pa.int64()), ("response", pa.string())]
        q += [("error", pa.string())]
    return {"result": pa.schema(res), "quarantine": pa.schema(q)}


def _generate_fn(model: dict, params: dict, threads: int, chunk_rows: int, fault: dict, staging: str,
                 batch_file: dict | None = None):
    """The mapInPandas function: one partition through this worker's generator, its rows
    written as Parquet files under `staging` (jobs._spark.TaskFiles), the manifest of those
    files and the partition's metrics returned. For an OpenAI batch file (`batch_file` =
    {"base", "model"}) each row has its own parameter set: one call per set in each chunk,
    each row with its own guide, and the rows carry their response body (results) or error
    (quarantine) for jobs/_batchfile.py's files."""
    def generate(batches):
        import pandas as pd
        import psutil
        from pyspark import TaskContext
        from libinfer import GenerationMetrics, GenerationParams
        from jobs._spark import TaskFiles, worker_generator
        from jobs._worker import generate_split
        if batch_file is not None:
            from jobs import _batchfile
        gp = GenerationParams.from_dict(params)
        ctx = TaskContext.get()
        state = {"gen": None, "load_s": 0.0, "metrics": GenerationMetrics(), "real": 0, "total": 0, "rows": 0,
                 "part": None, "t0": time.perf_counter()}

        def call(prompts, p, guides):
            """One generate call that cannot fail the task: halved on out of memory, row by
            row on any other error (jobs/_worker.py)."""
            outs, m = generate_split(state["gen"], prompts, p, guides)
            state["metrics"] = state["metrics"].merge(m)
            return outs

        def run(chunk):
            if state["gen"] is None:
                state["gen"], state["load_s"] = worker_generator(model, threads)
            gen = state["gen"]
            prompts = [[int(t) for t in ids] for ids in chunk["token_ids"]]
            if batch_file is None:
                groups = [(gp, list(range(len(prompts))), None)]
            else:
                groups = _batchfile.param_groups(chunk["params"].tolist(), chunk["guide"].tolist())
            outs, row_params = [None] * len(prompts), [gp] * len(prompts)
            for p, idx, guides in groups:
                for i, r in zip(idx, call([prompts[i] for i in idx], p, guides)):
                    outs[i], row_params[i] = r, p
            ok_lengths = [len(r.prompt_token_ids) for r in outs if r.error is None]
            real, total = batch_padding(ok_lengths, gen.max_batch_size)
            state["real"] += real
            state["total"] += total
            state["rows"] += sum(r.error is None for r in outs)
            res = {c: [] for c in files.schemas["result"].names}
            q = {c: [] for c in files.schemas["quarantine"].names}
            created = int(time.time())
            requests = chunk["request"].tolist() if batch_file is not None else [None] * len(prompts)
            for r, p, rid, text, row, request in zip(outs, row_params, chunk["id"], chunk["text"], chunk["row"],
                                                     requests):
                openai = None if batch_file is None else _batchfile.row_json(
                    request, r, p, batch_file, gen.tokenizer, int(row), rid, created)
                if r.error is None:
                    for c, v in (("id", rid), ("prompt", text), ("completions", [o.text for o in r.outputs]),
                                 ("finish_reasons", [o.finish_reason for o in r.outputs]),
                                 ("n_prompt_tokens", len(r.prompt_token_ids)),
                                 ("n_generated_tokens", sum(len(o.token_ids) for o in r.outputs))):
                        res[c].append(v)
                    if batch_file is not None:
                        res["row"].append(int(row))
                        res["response"].append(openai)
                else:
                    for c, v in (("id", rid), ("row", int(row)), ("stage", "generate"), ("reason", r.error),
                                 ("raw", text)):
                        q[c].append(v)
                    if batch_file is not None:
                        q["error"].append(openai)
            files.write("result", state["part"], res)
            files.write("quarantine", state["part"], q)

        files = TaskFiles(staging, file_schemas(batch_file is not None))
        pending = []
        for pdf in batches:
            if pdf.empty:
                continue
            if state["part"] is None:
                state["part"] = int(pdf["part"].iloc[0])
                files.mark_attempt(state["part"], ctx.attemptNumber() if ctx else 0)
                maybe_fail(fault, "generate", state["part"])
            pending.append(pdf)
            while sum(len(p) for p in pending) >= chunk_rows:
                whole = pd.concat(pending, ignore_index=True)
                pending = [whole.iloc[chunk_rows:]]
                run(whole.iloc[:chunk_rows])
        if pending and sum(len(p) for p in pending):
            run(pd.concat(pending, ignore_index=True))
        if state["part"] is None:
            return   # an empty partition (e.g. all done in a resumed run): no model, no files, no metrics
        written = files.close()
        m = dataclasses.asdict(state["metrics"])
        m.update(load_s=state["load_s"], batch_real=state["real"], batch_total=state["total"], rows=state["rows"],
                 part=state["part"], pid=os.getpid(), attempt=ctx.attemptNumber() if ctx else 0,
                 task_s=time.perf_counter() - state["t0"], write_s=files.write_s,
                 rss_bytes=psutil.Process().memory_info().rss, threads=threads)
        yield pd.DataFrame([*written, ("metrics", None, 0, json.dumps(m))], columns=["kind", "path", "rows", "metrics"])
    return generate


def resolve_params(cfg) -> dict:
    """GenerationParams as a dict; a sampled run without a seed gets one now, so that a
    retried task (and the log) sees the same seed as the first attempt."""
    params = _config.generation_params(cfg.generation).to_dict()
    if params["seed"] is None and not (params["greedy"] or params["temperature"] == 0):
        params["seed"] = random.getrandbits(31)
    return params


def footer_schema(spark, src: Output, name: str | None):
    """The Spark schema a Spark-written Parquet file keeps in its footer, read on the driver
    from one file (so reading the clustered data needs no schema-inference Spark job); None
    when there is no file or no such key (then Spark infers it)."""
    from pyspark.sql.types import StructType
    files = src.data_files(name) if name else src.data_files()
    if not files:
        return None
    try:
        jvm = spark._jvm
        footer = jvm.org.apache.parquet.hadoop.ParquetFileReader.readFooter(
            spark._jsc.hadoopConfiguration(), src._Path(src.path(*([name] if name else []), files[0])))
        meta = footer.getFileMetaData().getKeyValueMetaData().get("org.apache.spark.sql.parquet.row.metadata")
        return StructType.fromJson(json.loads(meta)) if meta else None
    except Exception:  # noqa: BLE001 - not a Spark-written Parquet file: let Spark infer (and complain)
        return None


def read_clustered(spark, in_dir: str):
    from pyspark.errors import AnalysisException
    src = Output(spark, in_dir)
    path = src.path("clustered") if src.exists("clustered") else in_dir
    if not src.exists():
        raise JobError(f"in: {in_dir} does not exist (run jobs.preprocess out={in_dir} first)")
    if src.exists("clustered") and not src.complete("clustered"):
        raise JobError(f"{path} is incomplete (no _SUCCESS): rerun jobs.preprocess")
    try:
        schema = footer_schema(spark, src, "clustered" if src.exists("clustered") else None)
        df = (spark.read.schema(schema) if schema is not None else spark.read).parquet(path)
    except AnalysisException as e:
        raise JobError(f"in: cannot read {path} as Parquet: {str(e).splitlines()[0]}") from None
    missing = [c for c in INPUT_COLUMNS if c not in df.columns]
    if missing:
        raise JobError(f"in: {path} is not a jobs.preprocess output (no column '{missing[0]}')")
    from jobs._batchfile import CLUSTERED_EXTRA
    extra = CLUSTERED_EXTRA if "request" in df.columns else []     # an OpenAI batch file's rows
    return src, df.select(*INPUT_COLUMNS, *extra)


def summarize(metric_rows: list[dict], wall_s: float) -> dict:
    """Job metrics from the per-partition metrics rows."""
    import numpy as np
    if not metric_rows:
        return {"wall_s": wall_s, "rows": 0, "generated_tokens": 0}
    total = lambda k: sum(m[k] for m in metric_rows)  # noqa: E731
    lat = [x for m in metric_rows for x in m["latencies_s"]]
    ttft = [x for m in metric_rows for x in m["ttft_s"]]
    loads = [m["load_s"] for m in metric_rows if m["load_s"] > 0]
    peaks: dict[int, int] = {}
    for m in metric_rows:
        peaks[m["pid"]] = max(peaks.get(m["pid"], 0), m["peak_memory_bytes"], m["rss_bytes"])
    gen_tokens, real_pad = total("generated_tokens"), total("real_tokens") + total("padded_tokens")
    prefill, decode = total("prefill_s"), total("decode_s")
    return {
        "wall_s": wall_s, "partitions": len(metric_rows), "rows": total("rows"),
        "rows_rejected": total("n_prompts") - total("rows"), "prompt_tokens": total("prompt_tokens"),
        "generated_tokens": gen_tokens, "tokens_per_s": gen_tokens / wall_s if wall_s else 0.0,
        "rows_per_s": total("rows") / wall_s if wall_s else 0.0,
        "prompt_tokens_per_s": total("prompt_tokens") / wall_s if wall_s else 0.0,
        "latency_p50_s": float(np.percentile(lat, 50)) if lat else 0.0,
        "latency_p95_s": float(np.percentile(lat, 95)) if lat else 0.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else 0.0,
        "padding_waste": waste(total("batch_real"), total("batch_total")),
        "libinfer_padding_waste": total("padded_tokens") / real_pad if real_pad else 0.0,
        "prefill_s": prefill, "decode_s": decode,
        "prefill_share": prefill / (prefill + decode) if prefill + decode else 0.0,
        # Shared prefixes: prompt tokens read from the prefix cache, prompt tokens computed, the
        # largest K/V bytes stored per running row (shared segments counted once), evictions.
        "prefix_hit_tokens": total("prefix_hit_tokens"), "prefill_tokens": total("prefill_tokens"),
        "prefix_hit_share": total("prefix_hit_tokens") / total("prompt_tokens") if total("prompt_tokens") else 0.0,
        "kv_bytes_per_row": max(m["kv_bytes_per_row"] for m in metric_rows),
        "prefix_evictions": total("prefix_evictions"),
        "model_load_s": max(loads) if loads else 0.0, "model_loads": len(loads), "workers": len(peaks),
        "peak_memory_bytes": max(peaks.values()), "peak_memory_bytes_mean": sum(peaks.values()) / len(peaks),
    }


def done_ids(out: Output):
    """ids already in out/results or in generate's own quarantine rows (for resume)."""
    from pyspark.sql import functions as F
    parts = []
    if out.has_data("results"):
        parts.append(out.read("results").select("id"))
    if out.has_data("quarantine"):
        parts.append(out.read("quarantine").filter(F.col("stage") == "generate").select("id"))
    if not parts:
        return None
    ids = parts[0]
    for p in parts[1:]:
        ids = ids.unionByName(p)
    return ids.distinct()


def carry_quarantine(src: Output, out: Output) -> int:
    """Copy preprocess' quarantine files into out/quarantine once (as pre-<name>: a file
    copy, no Spark job). Returns the number of files copied."""
    if src.root == out.root or not any(src.parquet_rows("quarantine", f) for f in src.data_files("quarantine")):
        return 0
    if any(f.startswith("pre-") for f in out.data_files("quarantine")):
        return 0
    if out.has_data("quarantine"):    # an output written before the copies were named pre-
        from pyspark.sql import functions as F
        if out.read("quarantine").filter(F.col("stage") == "preprocess").limit(1).count():
            return 0
    return out.copy_in(src, "quarantine", "quarantine", "pre-")


def run_wave(spark, wave, fn_for, out: Output) -> tuple[list[dict], dict]:
    """One wave in one Spark job: the tasks generate and write their own files under a
    staging directory and return a manifest (collect: one attempt per partition); the
    driver moves the reported files into results/ and quarantine/. Returns the metrics
    rows and {started attempts per partition, driver-side commit seconds}."""
    staging = f"_staging/generate-{uuid.uuid4().hex[:12]}"
    try:
        rows = wave.mapInPandas(fn_for(out.uri(staging)), MANIFEST_SCHEMA).collect()
        t0 = time.perf_counter()
        for kind, name in (("result", "results"), ("quarantine", "quarantine")):
            out.move_in([r.path for r in rows if r.kind == kind and r.rows > 0], name)
        attempts: dict[int, int] = {}
        for f in out.data_files(staging, "_attempts"):
            part = int(f.split("-")[0])
            attempts[part] = attempts.get(part, 0) + 1
        return [json.loads(r.metrics) for r in rows if r.kind == "metrics"], \
            {"attempts": attempts, "commit_s": time.perf_counter() - t0}
    finally:
        out.drop_staging(staging)


def run_generate(spark, cfg, in_dir: str, out: Output, resume: bool) -> dict:
    """The generate stage: cfg.waves Spark jobs, each writing its rows once. Returns the
    job metrics, with `_breakdown` (read, model load, generate, write, commit seconds)."""
    from omegaconf import OmegaConf
    from pyspark.sql import functions as F
    from jobs._model import ensure_model
    times = Breakdown()
    with times.phase("read"):
        ensure_model(cfg.model)   # a random-init test model is written here, not by racing workers
        model = OmegaConf.to_container(cfg.model, resolve=True)
        fault = OmegaConf.to_container(cfg.fault, resolve=True)
        params = resolve_params(cfg)
        src, df = read_clustered(spark, in_dir)
        batch_file = None
        if "request" in df.columns:
            from jobs import _batchfile
            batch_file = {"base": _batchfile.base_params(cfg), "model": cfg.model.name}
            out.delete("openai")       # a view of results + quarantine: written again at the end
        df = df.withColumn("part", F.spark_partition_id())     # the cluster's identity, before any filter
        n_parts = df.rdd.getNumPartitions()                     # planning only, no Spark job
        carry_quarantine(src, out)
        if resume:
            done = done_ids(out)
            if done is not None:
                df = df.join(F.broadcast(done), "id", "left_anti")   # broadcast: keeps the clusters' partitions
    progress(f"generate: {n_parts} partitions from {in_dir}" + (" (resume: rows already done are skipped)"
                                                                 if resume else ""))

    def fn_for(staging: str):
        return _generate_fn(model, params, cfg.spark.task_cpus, cfg.chunk_rows, fault, staging, batch_file)

    # A killed driver leaves its wave's staging directory behind (never moved: not output).
    if out.exists("_staging"):
        for st in out.fs.listStatus(out._Path(out.path("_staging"))):
            if st.getPath().getName().startswith("generate-"):
                out.fs.delete(st.getPath(), True)
    t0 = time.perf_counter()
    metric_rows: list[dict] = []
    attempts: dict[int, int] = {}
    commit_s = 0.0
    for w in range(cfg.waves):
        wave = df.filter((F.col("part") * cfg.waves / n_parts).cast("int") == w) if cfg.waves > 1 else df
        rows, info = run_wave(spark, wave, fn_for, out)
        metric_rows += rows
        commit_s += info["commit_s"]
        for p, n in info["attempts"].items():
            attempts[p] = attempts.get(p, 0) + n
        if cfg.waves > 1:
            progress(f"generate: wave {w + 1}/{cfg.waves} committed ({sum(m['rows'] for m in rows)} rows)")
    out.mark_complete("results")
    out.mark_complete("quarantine")
    metrics = summarize(metric_rows, time.perf_counter() - t0)
    metrics["task_attempts"] = sum(attempts.values())
    metrics["task_attempts_retried"] = sum(n - 1 for n in attempts.values())
    metrics["partitions_recomputed"] = sum(1 for n in attempts.values() if n > 1)
    # In-task phases are summed over tasks; divided by the workers that ran side by side
    # they are the wall they took (the rest of the waves' wall is generating).
    slots = max(1, metrics.get("workers", 1))
    load = sum(m["load_s"] for m in metric_rows) / slots
    write = sum(m["write_s"] for m in metric_rows) / slots
    times.add("model_load", load)
    times.add("generate", metrics["wall_s"] - commit_s - load - write)
    times.add("write", write)
    times.add("commit", commit_s)
    if batch_file:
        from jobs._batchfile import write_files
        with times.phase("openai_files"):
            metrics.update(write_files(out))
        progress(f"generate: OpenAI batch output: {metrics['openai_output_lines']} lines in "
                 f"{out.path('openai', 'output.jsonl')}, {metrics['openai_error_lines']} in "
                 f"{out.path('openai', 'errors.jsonl')}")
    metrics["_params"] = params
    metrics["_breakdown"] = times.phases
    # One line per partition task: which worker ran it, its load, time and peak memory.
    metrics["_partitions"] = [{k: m[k] for k in ("part", "pid", "attempt", "rows", "prompt_tokens", "prefix_hit_tokens",
                                                  "prefill_tokens", "generated_tokens", "task_s", "load_s", "write_s",
                                                  "peak_memory_bytes", "rss_bytes", "threads")}
                              for m in sorted(metric_rows, key=lambda m: m["part"])]
    progress(f"generate: {metrics['rows']} rows, {metrics['generated_tokens']} generated tokens in "
             f"{metrics['wall_s']:.1f}s = {metrics.get('tokens_per_s', 0):.1f} tokens/s; padding waste "
             f"{100 * metrics.get('padding_waste', 0):.1f}% (job batches), "
             f"{100 * metrics.get('libinfer_padding_waste', 0):.1f}% (decode attention); "
             f"model loads {metrics.get('model_loads', 0)} in {metrics.get('workers', 0)} workers; "
             f"{metrics['task_attempts']} task attempts, {metrics['task_attempts_retried']} retried")
    progress(f"generate: {prefix_cache_line(metrics)}")
    progress(f"generate: results in {out.path('results')}, quarantine in {out.path('quarantine')}")
    return metrics


def prefix_cache_line(m: dict) -> str:
    return (f"prefix cache {m.get('prefix_hit_tokens', 0)} of {m.get('prompt_tokens', 0)} prompt tokens reused "
            f"({100 * m.get('prefix_hit_share', 0):.1f}%), {m.get('prefill_tokens', 0)} computed; "
            f"K/V {m.get('kv_bytes_per_row', 0) / 2**20:.1f} MiB per running row (peak); "
            f"{m.get('prefix_evictions', 0)} evictions")


def log_generate(metrics: dict, prefix: str = "") -> None:
    import mlflow
    from jobs._tracking import log_metrics
    log_metrics({k: v for k, v in metrics.items() if not k.startswith("_")}, prefix=prefix)
    if mlflow.active_run() is None:
        return
    if metrics["_params"].get("seed") is not None:
        mlflow.set_tag("generation.seed_used", metrics["_params"]["seed"])
    mlflow.log_dict(metrics["_partitions"], f"{prefix.replace('.', '_')}partitions.json")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
@entry_point
def main(cfg) -> None:
    from jobs._spark import session
    from jobs._tracking import log_metrics, mlflow_run, run_url
    from libinfer.lab.cost import as_metrics, cost_line, job_cost
    t0 = time.perf_counter()
    times = Breakdown({"python_start": process_age_s()})    # interpreter, imports, Hydra
    _config.validate(cfg)
    if not cfg.get("in"):
        raise JobError("in is not set: pass in=DIR (a jobs.preprocess output)")
    from jobs.preprocess import check_local_path
    check_local_path("in", cfg["in"])
    if os.path.abspath(str(cfg["in"])) == os.path.abspath(str(cfg.out)):
        raise JobError("in and out are the same directory: give generate its own out "
                       "(jobs.pipeline writes both stages into one)")
    with times.phase("spark_start"):
        spark = session(cfg, " generate")
        out = Output(spark, cfg.out)
        prepare_output(out, ["results", "quarantine"], resume=cfg.resume, overwrite=cfg.overwrite)
    mlflow_t0 = time.perf_counter()
    with mlflow_run(cfg, "generate") as run:
        times.add("mlflow", time.perf_counter() - mlflow_t0)
        metrics = run_generate(spark, cfg, cfg["in"], out, cfg.resume)
        times.update(metrics["_breakdown"])
        mlflow_t0 = time.perf_counter()
        if run is not None:
            log_generate(metrics)
        times.add("mlflow", time.perf_counter() - mlflow_t0)
        wall = times.phases["python_start"] + time.perf_counter() - t0
        cost = job_cost(metrics, cfg, wall_s=wall)     # the whole process holds the executors
        if run is not None:
            log_metrics({**times.metrics(wall), **as_metrics(cost)})
        print("\n".join(["", f"generate done in {wall:.1f}s (whole process)", cost_line(cost), *times.lines(wall)]),
              flush=True)
        if run is not None:
            progress(run_url(run))
    spark.stop()


if __name__ == "__main__":
    main()
