"""jobs.preprocess: read a corpus, clean it, tokenize it with the model's tokenizer, and
cluster it by shared prefix and token length, so that each partition holds the rows of one
prompt family (the same few-shot header) at similar lengths.

    python -m jobs.preprocess data.path=IN.jsonl data.id_column=id data.text_column=prompt out=DIR

Writes DIR/clustered/ (Parquet: id, text, token_ids, n_tokens, row; range-partitioned as
`data.cluster_by` says, see `cluster`) and DIR/quarantine/ (id, row, stage, reason, raw) for
rows that cannot be generated. Every input row lands in exactly one.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/preprocess.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import json
import math
import os
import re
import time
import unicodedata

import hydra

from jobs import _config
from jobs._spark import JobError, Output, batch_padding, entry_point, maybe_fail, prepare_output, progress, waste

PARSED_SCHEMA = ("row long, id string, text string, token_ids array<int>, n_tokens int, "
                 "blocks array<long>, reason string, raw string")
CLUSTERED_COLUMNS = ["id", "text", "token_ids", "n_tokens", "row"]
QUARANTINE_COLUMNS = ["id", "row", "stage", "reason", "raw"]
# openai_batch rows also carry their parameter set, guide and request (jobs/_batchfile.py).
BATCH_SCHEMA = ", params string, guide string, request string, error string"

# Control characters except tab and newline (prompts are few-shot blocks: newlines matter).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[^\S\n]+")          # whitespace runs other than newlines
_SPACE_AROUND_NL = re.compile(r" ?\n ?")


def clean_text(text: str, clean: dict) -> str:
    if clean.get("unicode_form"):
        text = unicodedata.normalize(clean["unicode_form"], text)
    if clean.get("strip_control"):
        text = _CONTROL.sub("", text)
    if clean.get("collapse_whitespace"):
        text = _SPACE_AROUND_NL.sub("\n", _SPACES.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n")))
    if clean.get("strip"):
        text = text.strip()
    return text


def decode_record(value: bytes | None) -> tuple[str | None, str | None, str | None]:
    """An input record's bytes -> (text, reason, raw): reason is set for a null record or
    invalid UTF-8, raw is then what can be shown of it."""
    if value is None:
        return None, "null record", None
    try:
        return bytes(value).decode("utf-8"), None, None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}", bytes(value).decode("utf-8", "backslashreplace")


def parse_record(value: bytes | None, row: int, data: dict) -> tuple[str | None, str | None, str | None, str | None]:
    """One input record -> (id, text, reason, raw). `reason` is None for a usable row;
    `raw` (the record as text) is kept only for quarantined rows."""
    line, reason, raw = decode_record(value)
    if reason is not None:
        return None, None, reason, raw
    if data["format"] == "text":
        return str(row), line, None, None
    try:
        rec = json.loads(line)
    except ValueError as e:
        return None, None, f"invalid JSON: {e}", line
    if not isinstance(rec, dict):
        return None, None, f"not a JSON object: {type(rec).__name__}", line
    id_col, text_col = data["id_column"], data["text_column"]
    rid = rec.get(id_col)
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return None, None, f"missing id (null, empty or no '{id_col}' field)", line
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None, None, f"bad id {rid!r}: must be a string or integer", line
    rid = str(rid)
    text = rec.get(text_col)
    if text is None:
        return rid, None, f"null text (no '{text_col}' value)", line
    if not isinstance(text, str):
        return rid, None, f"text is not a string: {type(text).__name__}", line
    return rid, text, None, line


def _prepare_fn(data: dict, model: dict, fault: dict, batch_file: dict | None = None):
    """The mapInPandas function: parse, clean, template, tokenize, check lengths. For
    openai_batch (`batch_file` = {"base", "seed"}) each line is read by jobs._batchfile instead
    of parse/clean/template, and the rows carry its params, guide, request and error."""
    def prepare(batches):
        import pandas as pd
        from pyspark import TaskContext
        from jobs._spark import worker_tokenizer
        from libinfer.engine.kv_cache import block_hashes
        ctx = TaskContext.get()
        maybe_fail(fault, "preprocess", ctx.partitionId() if ctx else 0)
        tok, context = worker_tokenizer(model)
        for pdf in batches:
            out = {k: [] for k in ("row", "id", "text", "reason", "raw")}
            lines = []      # openai_batch: each row's _batchfile.Line
            for row, value in zip(pdf["row"].tolist(), pdf["value"].tolist()):
                if batch_file is not None:
                    line, raw = read_batch_record(value, tok, batch_file)
                    lines.append(line)
                    rid, text, reason = line.custom_id, line.text, line.reason
                else:
                    rid, text, reason, raw = parse_record(value, row, data)
                if reason is None:
                    if len(text) > data["max_chars"]:
                        reason = f"text too long: {len(text)} characters > data.max_chars={data['max_chars']}"
                    elif batch_file is None:
                        text = clean_text(text, data["clean"])
                        if not text:
                            reason = "empty text (after cleaning)"
                if reason is None and batch_file is None:
                    if data["template"]:   # "\n" in a template is a newline (overrides cannot type one)
                        text = data["template"].replace("\\n", "\n").replace("{text}", text)
                    if data["chat_template"]:
                        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True)
                out["row"].append(row)
                out["id"].append(rid)
                out["text"].append(text if reason is None else None)
                out["reason"].append(reason)
                # openai_batch keeps every line (a later duplicate is found after this step).
                keep = reason is not None or batch_file is not None
                out["raw"].append((raw if raw is not None else text) if keep else None)
            ok = [i for i, r in enumerate(out["reason"]) if r is None]
            given = {i: lines[i].token_ids for i in ok if lines and lines[i].token_ids is not None}
            to_encode = [i for i in ok if i not in given]
            ids = dict(zip(to_encode, tok([out["text"][i] for i in to_encode]).input_ids if to_encode else []))
            ids.update(given)
            token_ids, n_tokens, blocks = ([None] * len(out["row"]) for _ in range(3))
            for i in ok:
                t = list(ids[i])
                if len(t) >= context:
                    out["reason"][i] = f"prompt too long: {len(t)} tokens >= model context {context}"
                elif not t:
                    out["reason"][i] = "empty prompt: it has no tokens"
                else:
                    token_ids[i], n_tokens[i], blocks[i] = t, len(t), block_hashes(t)
                    continue
                out["raw"][i], out["text"][i] = out["raw"][i] or out["text"][i], None
            extra = {}
            if batch_file is not None:
                extra = batch_columns(lines, out["reason"])
            yield pd.DataFrame({**out, "token_ids": token_ids, "n_tokens": pd.array(n_tokens, dtype="Int32"),
                                "blocks": blocks, **extra})
    return prepare


def read_batch_record(value, tok, batch_file: dict):
    """One openai_batch record -> (jobs._batchfile.Line, the line as text)."""
    from jobs import _batchfile
    text, reason, raw = decode_record(value)
    if reason is not None:
        return _batchfile.Line(reason=reason, error=_batchfile.line_error("invalid_line", reason)[1]), raw
    return _batchfile.read_line(text, tok, batch_file["base"], batch_file["seed"]), text


def batch_columns(lines: list, reasons: list) -> dict:
    """The openai_batch columns of the rows (a row refused after its line was read, e.g.
    too long, gets its error here)."""
    from jobs import _batchfile
    cols = {k: [] for k in ("params", "guide", "request", "error")}
    for line, reason in zip(lines, reasons):
        ok = reason is None
        cols["params"].append(line.params if ok else None)
        cols["guide"].append(line.guide if ok else None)
        cols["request"].append(line.request if ok else None)
        cols["error"].append(None if ok else line.error or _batchfile.row_error_info(
            _batchfile.request_kind(line.request), reason))
    return cols


def read_corpus(spark, data: dict):
    """The corpus as (row, value): value is the record's bytes (a JSON object for jsonl and
    parquet, the line for text); invalid UTF-8 stays visible as bytes."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window
    from pyspark.errors import AnalysisException
    path, fmt = data["path"], data["format"]
    if not path:
        raise JobError("data.path is not set: pass data.path=FILE_OR_DIR")
    try:
        if fmt == "parquet":
            df = spark.read.parquet(path)
            missing = [c for c in (data["id_column"], data["text_column"]) if c not in df.columns]
            if missing:
                raise JobError(f"{path}: column '{missing[0]}' not found (columns: {', '.join(df.columns)}); "
                               f"set data.id_column / data.text_column")
            df = df.select(F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns])).cast("binary").alias("value"))
        else:
            df = spark.read.text(path).select(F.col("value").cast("binary").alias("value"))
    except AnalysisException as e:
        msg = str(e).split("\n")[0]
        if "PATH_NOT_FOUND" in msg or "does not exist" in msg:
            raise JobError(f"data.path: {path} does not exist") from None
        raise JobError(f"cannot read {path} as {fmt}: {msg}") from None
    if fmt == "text":   # ids are line numbers: number the lines in file order
        df = df.withColumn("_m", F.monotonically_increasing_id())
        df = df.withColumn("row", F.row_number().over(Window.orderBy("_m")) - 1).drop("_m")
    else:
        df = df.withColumn("row", F.monotonically_increasing_id())
    if fmt != "text":  # a blank line is no record (JSON lines allows them)
        df = df.filter(F.length(F.trim(F.col("value").cast("string"))) > 0)
    if data["limit"]:
        df = df.orderBy("row").limit(data["limit"])
    return df.select("row", "value")


def refuse_duplicates(parsed):
    """Duplicate ids are ambiguous: every row that shares an id goes to quarantine."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window
    n_same = F.when(F.col("id").isNotNull(), F.count(F.lit(1)).over(Window.partitionBy("id"))).otherwise(1)
    parsed = parsed.withColumn("_n", n_same).withColumn(
        "reason", F.when(F.col("reason").isNull() & (F.col("_n") > 1),
                         F.format_string("duplicate id: %d rows have it", F.col("_n"))).otherwise(F.col("reason")))
    return parsed.drop("_n")


def refuse_later_duplicates(parsed):
    """A batch file's custom_id names one request: the first line that has it is that
    request (whatever becomes of it), every later line with it is refused."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window
    from jobs import _batchfile
    first = F.min("row").over(Window.partitionBy("id"))
    later = F.col("id").isNotNull() & (F.col("row") > F.col("_first"))
    reason = F.format_string("custom_id: duplicate of an earlier line (row %d); custom_id must be unique in the file",
                             F.col("_first"))
    parsed = parsed.withColumn("_first", first)
    return (parsed.withColumn("reason", F.when(later, reason).otherwise(F.col("reason")))
            .withColumn("error", F.when(later, F.lit(_batchfile.DUPLICATE)).otherwise(F.col("error")))
            .drop("_first"))


def n_partitions(spark, data: dict, n_rows: int, batch: int) -> int:
    if data["num_partitions"]:
        return data["num_partitions"]
    # A multiple of the task slots, up to 4 per slot (long clusters take longer: smaller
    # pieces balance the slots), but not so many that a partition holds less than a batch.
    slots = spark.sparkContext.defaultParallelism
    return slots * max(1, min(4, math.ceil(n_rows / (batch * slots))))


# ------------------------------------------------------------------ prefix families
#
# `blocks` holds the chain hash of each whole 16-token block of a row's token ids (the
# engine's own prefix-cache identity, libinfer.engine.kv_cache.block_hashes): entry k stands
# for tokens [0, 16(k+1)). Counting the rows per hash gives the prefix trie of the corpus
# (c_k rows begin with this row's first k+1 blocks; c_k never grows with k). A row's family
# is the node on its own path that saves the most prefill when computed once for all the
# rows below it: argmax_k (c_k - 1) * (k + 1), ties to the shallower node. Why this node and
# not a fixed depth or the deepest shared block:
# - the hash of the first 1-4 blocks merges different tasks behind one common opening (a
#   chat template's system turn, a shared instruction line) into one family;
# - the deepest shared block splits a task into fragments: two queries that start with the
#   same words share one more block (the one across the header's end) than the rest of
#   their task, and would be a family of their own, in another partition;
# - the argmax lands on the end of the task's header for every row of the task (60 rows x
#   25 blocks saves far more than 3 rows x 26 or 240 rows x 1), whatever their query is.
# Cost: one explode of n_tokens/16 longs per row, one shuffle by hash and one by row; no
# broadcast, so it scales with the corpus like tokenizing does. Rows that share no block
# with any other row have no family (null) and are clustered by length after the families.
# A hash collision only misorders rows (the engine checks the tokens on every hit).

def prefix_families(good):
    """(row, family, shared_blocks, reusable) for every row that shares >= 1 leading block
    with another row: family = the chosen node's hash, shared_blocks = the blocks it shares
    with at least one other row, reusable = its share of the tokens a cache holding every
    shared block once would not compute (summed over rows: sum over nodes of 16 (c - 1))."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window
    from libinfer.engine.kv_cache import BLOCK
    nodes = good.select("row", F.posexplode("blocks").alias("k", "h"))
    nodes = nodes.withColumn("c", F.count(F.lit(1)).over(Window.partitionBy("h"))).filter(F.col("c") >= 2)
    saved = F.struct(((F.col("c") - 1) * (F.col("k") + 1)).alias("saved"), (-F.col("k")).alias("shallow"))
    return nodes.groupBy("row").agg(F.max_by("h", saved).alias("family"), (F.max("k") + 1).alias("shared_blocks"),
                                    F.sum(BLOCK * (F.col("c") - 1) / F.col("c")).alias("reusable"))


def local_families(blocks: list[list[int]]) -> list[int | None]:
    """The same family choice as `prefix_families`, in one process (the single-process
    baseline and the tests' reference)."""
    from collections import Counter
    c = Counter(h for b in blocks for h in b)
    return [max(((c[h] - 1) * (k + 1), -k, h) for k, h in enumerate(b) if c[h] >= 2)[2]
            if b and c[b[0]] >= 2 else None for b in blocks]


def with_families(good, families):
    """good + family and root (the first block's hash; null without a family): sorting on
    (root, family) keeps the families of one opening next to each other."""
    from pyspark.sql import functions as F
    keyed = good.join(families.select("row", "family"), "row", "left")
    return keyed.withColumn("root", F.when(F.col("family").isNotNull(), F.col("blocks")[0]))


def cluster(df, parts: int, mode: str):
    """The partitions generate runs, in order:
    - length: range-partition on token count (longest partition first, so the long tasks
      start first), sorted by length inside each partition;
    - prefix: the same inside each prefix family (`with_families`): a family's rows are
      contiguous, in one partition or in neighbouring ones, longest first; rows without a
      family come last, clustered by length as above. With no shared prefix this is `length`;
    - none: arrival order.
    openai_batch rows (a `params` column) are ordered by parameter set first, so that the
    rows of one generate call (one set) are neighbours; prefix or length inside each set."""
    from pyspark.sql import functions as F
    if mode == "none":
        return df.repartitionByRange(parts, "row").sortWithinPartitions("row")
    fam = [F.asc_nulls_last("root"), F.asc_nulls_last("family")] if mode == "prefix" else []
    fam = (["params"] if "params" in df.columns else []) + fam    # openai_batch: one parameter set after the other
    return df.repartitionByRange(parts, *fam, F.desc("n_tokens"), "id").sortWithinPartitions(*fam, "n_tokens", "id")


def padding_of(df, batch: int) -> float:
    """Padding waste of the batches a job forms: consecutive rows of each partition, in
    order, cut into batches of `batch` rows, each padded to its longest row."""
    def per_partition(batches):
        import pandas as pd
        lengths = [n for pdf in batches for n in pdf["n_tokens"].tolist()]
        real, total = batch_padding(lengths, batch)
        yield pd.DataFrame({"real": [real], "total": [total]})
    rows = df.select("n_tokens").mapInPandas(per_partition, "real long, total long").collect()
    return waste(sum(r.real for r in rows), sum(r.total for r in rows))


def length_histogram(lengths_counts: list[tuple[int, int]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if lengths_counts:
        xs, ws = zip(*lengths_counts)
        ax.hist(xs, weights=ws, bins=min(50, max(5, len(xs))))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("rows")
    ax.set_title("Prompt length histogram")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def single_process_baseline(data: dict, model: dict) -> float:
    """Seconds the same parse/clean/tokenize/sort/write takes in this one process, without
    Spark (the talk's 2.3 compares its distributed preprocessing against exactly this)."""
    import tempfile
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    t0 = time.perf_counter()
    with open(data["path"], "rb") as f:
        lines = [l.rstrip(b"\n") for l in f]
    if data["format"] != "text":
        lines = [l for l in lines if l.strip()]
    if data["limit"]:
        lines = lines[:data["limit"]]
    prepare = _prepare_fn(data, model, {})
    chunks = [lines[i:i + 10_000] for i in range(0, len(lines), 10_000)]
    batches = (pd.DataFrame({"row": range(i * 10_000, i * 10_000 + len(c)), "value": c}) for i, c in enumerate(chunks))
    out = pd.concat(list(prepare(batches)), ignore_index=True)
    good = out[out["reason"].isna()].copy()
    mode = _config.cluster_by(data)
    if mode == "prefix":
        good["family"] = pd.array(local_families(list(good["blocks"])), dtype="Int64")
        good["root"] = pd.array([b[0] if f is not pd.NA else None for b, f in zip(good["blocks"], good["family"])],
                                dtype="Int64")
    keys = {"prefix": ["root", "family", "n_tokens", "id"], "length": ["n_tokens", "id"], "none": ["row"]}[mode]
    good = good.sort_values(keys, na_position="last")
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.Table.from_pandas(good[CLUSTERED_COLUMNS]), f"{tmp}/c.parquet")
    return time.perf_counter() - t0


def run_preprocess(spark, cfg, out: Output) -> dict:
    """Preprocess into out/clustered and out/quarantine; returns the metrics."""
    from omegaconf import OmegaConf
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from libinfer.engine.kv_cache import BLOCK
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    fault = OmegaConf.to_container(cfg.fault, resolve=True)
    batch_file = None
    if data["format"] == "openai_batch":
        from jobs import _batchfile
        batch_file = {"base": _batchfile.base_params(cfg), "seed": _batchfile.job_seed(cfg)}
        progress(f"preprocess: OpenAI batch file; defaults of a line: {data['batch_defaults']}; "
                 f"sampled lines without a seed get seed {batch_file['seed']}")
    from jobs._model import ensure_model
    ensure_model(cfg.model)   # a random-init test model is written here, not by racing workers
    t0 = time.perf_counter()
    progress(f"preprocess: reading {data['path']} ({data['format']})")
    raw = read_corpus(spark, data)
    slots = spark.sparkContext.defaultParallelism
    if raw.rdd.getNumPartitions() < slots:   # a small file is one split: tokenize on every slot
        raw = raw.repartition(slots, "row")
    parsed = raw.mapInPandas(_prepare_fn(data, model, fault, batch_file),
                             PARSED_SCHEMA + (BATCH_SCHEMA if batch_file else ""))
    parsed = (refuse_later_duplicates if batch_file else refuse_duplicates)(parsed)
    parsed = parsed.withColumn("raw", F.when(F.col("reason").isNotNull(), F.coalesce("raw", "text")))
    parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    extra = _batchfile.CLUSTERED_EXTRA if batch_file else []
    families = None
    try:
        counts = {r["ok"]: r["count"] for r in parsed.groupBy(F.col("reason").isNull().alias("ok")).count().collect()}
        n_ok, n_bad = counts.get(True, 0), counts.get(False, 0)
        progress(f"preprocess: {n_ok + n_bad} rows read, {n_ok} usable, {n_bad} to quarantine")
        good = parsed.filter(F.col("reason").isNull()).select(*CLUSTERED_COLUMNS, "blocks", *extra)
        bad = parsed.filter(F.col("reason").isNotNull()).select(
            "id", "row", F.lit("preprocess").alias("stage"), "reason", "raw", *(["error"] if batch_file else []))
        parts = n_partitions(spark, data, n_ok, model["max_batch_size"])
        mode = _config.cluster_by(data)
        families = prefix_families(good).persist(StorageLevel.MEMORY_AND_DISK)
        keyed = with_families(good, families)
        out.commit(cluster(keyed, parts, mode).select(*CLUSTERED_COLUMNS, *extra), "clustered")
        out.commit(bad, "quarantine")
        out.mark_complete("clustered")
        wall = time.perf_counter() - t0
        hist = sorted((r["n_tokens"], r["count"]) for r in good.groupBy("n_tokens").count().collect())
        batch = model["max_batch_size"]
        clustered_back = spark.read.parquet(out.path("clustered"))
        prompt_tokens = sum(n * c for n, c in hist)
        fam = families.agg(F.countDistinct("family").alias("n"), F.sum("shared_blocks").alias("blocks"),
                           F.sum("reusable").alias("reusable")).first()
        shared = BLOCK * (fam["blocks"] or 0)
        metrics = {
            "rows_in": n_ok + n_bad, "rows_out": n_ok, "rows_quarantined": n_bad,
            "prompt_tokens": prompt_tokens, "partitions": parts, "cluster_by": mode,
            "wall_s": wall, "rows_per_s": (n_ok + n_bad) / wall if wall else 0.0,
            "tokens_min": hist[0][0] if hist else 0, "tokens_max": hist[-1][0] if hist else 0,
            # Few-shot headers: families, prompt tokens in blocks that >= 2 rows share, and the
            # part of them a cache holding each shared block once need not compute.
            "prefix_families": fam["n"], "prefix_shared_tokens": shared,
            "prefix_shared_share": shared / prompt_tokens if prompt_tokens else 0.0,
            "prefix_reusable_tokens": round(fam["reusable"] or 0),
            # The batches generate forms from these partitions, and from the other orders.
            "padding_waste": padding_of(clustered_back, batch),
        }
        for other, name in (("prefix", "prefix"), ("length", "sorted"), ("none", "unsorted")):
            metrics[f"padding_waste_{name}"] = metrics["padding_waste"] if other == mode else padding_of(
                cluster(keyed.select("n_tokens", "row", "id", "family", "root"), parts, other), batch)
        if batch_file:
            metrics["param_sets"] = good.select("params").distinct().count()
        metrics["_histogram"] = hist
        local = "://" not in str(data["path"]) and os.path.isfile(str(data["path"]))
        if cfg.compare_single_process and local and data["format"] in ("jsonl", "text"):
            single = single_process_baseline(data, model)
            metrics.update(single_process_s=single, speedup_vs_single_process=single / wall)
            progress(f"preprocess: one process without Spark takes {single:.1f}s: Spark is "
                     f"{single / wall:.2f}x that on {spark.sparkContext.defaultParallelism} task slots")
        progress(f"preprocess: {n_ok} rows -> {out.path('clustered')} ({parts} partitions, cluster_by={mode}), "
                 f"{n_bad} -> {out.path('quarantine')}; {metrics['rows_per_s']:.1f} rows/s; {prefix_line(metrics)}; "
                 f"{padding_line(metrics, batch)}")
        return metrics
    finally:
        parsed.unpersist()
        if families is not None:
            families.unpersist()


def prefix_line(m: dict) -> str:
    return (f"{m['prefix_families']} prefix families, {100 * m['prefix_shared_share']:.1f}% of prompt tokens "
            f"in shared prefixes")


def padding_line(m: dict, batch: int | None = None) -> str:
    rows = f" of {batch}-row batches" if batch else " of the job's batches"
    return (f"padding waste{rows} {100 * m['padding_waste']:.1f}% (prefix families "
            f"{100 * m['padding_waste_prefix']:.1f}%, sorted by length {100 * m['padding_waste_sorted']:.1f}%, "
            f"arrival order {100 * m['padding_waste_unsorted']:.1f}%)")


def log_preprocess(metrics: dict, prefix: str = "") -> None:
    import os
    import tempfile
    import mlflow
    from jobs._tracking import log_metrics
    log_metrics({k: v for k, v in metrics.items() if not k.startswith("_")}, prefix=prefix)
    if mlflow.active_run() is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{prefix}length_histogram.png".replace(".", "_", prefix.count(".")))
            length_histogram(metrics["_histogram"], path)
            mlflow.log_artifact(path)


def check_local_path(key: str, path: str | None) -> None:
    """Fail before Spark starts when a local input path does not exist."""
    if path and "://" not in path and not path.startswith("file:"):
        import glob
        import os
        if not os.path.exists(path) and not glob.glob(path):
            raise JobError(f"{key}: {path} does not exist")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
@entry_point
def main(cfg) -> None:
    from jobs._spark import session
    from jobs._tracking import mlflow_run, run_url
    _config.validate(cfg)
    check_local_path("data.path", cfg.data.path)
    spark = session(cfg, " preprocess")
    out = Output(spark, cfg.out)
    prepare_output(out, ["clustered", "quarantine"], resume=False, overwrite=cfg.overwrite or cfg.resume)
    with mlflow_run(cfg, "preprocess") as run:
        metrics = run_preprocess(spark, cfg, out)
        out.mark_complete("quarantine")
        if run is not None:
            log_preprocess(metrics)
            progress(run_url(run))
    spark.stop()


if __name__ == "__main__":
    main()
