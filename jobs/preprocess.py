"""jobs.preprocess: read a corpus, clean it, tokenize it with the model's tokenizer, and
cluster it by shared prefix and token length, so that each partition holds the rows of one
prompt family (the same few-shot header) at similar lengths.

    python -m jobs.preprocess data.path=IN.jsonl data.id_column=id data.text_column=prompt out=DIR

Writes DIR/clustered/ (Parquet: id, text, token_ids, n_tokens, row; range-partitioned as
`data.cluster_by` says, see `cluster`) and DIR/quarantine/ (id, row, stage, reason, raw) for
rows that cannot be generated. Every input row lands in exactly one.

How it runs (docs/jobs.md, "Preprocessing at scale"): one `mapInArrow` pass parses, cleans
and batch-tokenizes each partition, keeping token ids as Arrow list arrays (offsets + flat
int32 values, never a Python list per row in the job's own code) and hashing every row's
16-token blocks with numpy; that pass is cached. Two small aggregations of the cache find the
duplicate ids and the blocks that >= 2 rows share (summaries: only those come to the driver),
then an iterator Arrow UDF over the block hashes alone picks each row's prefix family, Spark
range-partitions and sorts, and a last UDF over n_tokens alone measures the padding of the
written batches on their way to the writer (text and token ids stay in the JVM). Every
statistic (length histogram, padding, prefix families) comes from those passes through
accumulators keyed by partition (a retried or recomputed task replaces its entry, never adds a
second one), not from extra Spark jobs over the data.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/preprocess.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import itertools
import json
import math
import os
import re
import time
import unicodedata

import hydra
from pyspark.accumulators import AccumulatorParam

from jobs import _config
from jobs._spark import (JobError, Output, entry_point, input_splits, maybe_fail, prepare_output, progress,
                         sql_conf, waste)

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
# The ASCII whitespace other than " " and "\n" (what str.isspace() and re's \s also accept).
_ASCII_ODD_SPACES = ("  ", "\t", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f")


def collapse_whitespace(text: str) -> str:
    """Runs of whitespace other than newlines -> one space, no space around a newline. The
    regex passes cost most of the cleaning (re tests every character), so they run only where
    they can change something: an ASCII text with no double space and no other whitespace
    than single spaces and newlines is left as it is (the same result, found by substring
    scans in C); a text without a newline skips the newline pass."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() or any(s in text for s in _ASCII_ODD_SPACES):
        text = _SPACES.sub(" ", text)
    return _SPACE_AROUND_NL.sub("\n", text) if "\n" in text else text


def clean_text(text: str, clean: dict) -> str:
    if clean.get("unicode_form"):
        text = unicodedata.normalize(clean["unicode_form"], text)
    if clean.get("strip_control"):
        text = _CONTROL.sub("", text)
    if clean.get("collapse_whitespace"):
        text = collapse_whitespace(text)
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


# ------------------------------------------------------------------ Arrow batches
#
# Token ids travel as Arrow list arrays: the offsets (row i holds values[off[i]:off[i+1]])
# and one flat int32 array. The tokenizer's batch encoder is the one place that hands out a
# list per row (its Encoding.ids); pyarrow turns those into the flat array in C.

_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(z):
    """splitmix64's finaliser on a uint64 numpy array (wrapping arithmetic)."""
    import numpy as np
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(_M1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def chain_hashes(offsets, flat):
    """(block offsets, hashes): hash k of a row identifies its tokens [0, 16(k + 1)), like
    libinfer.engine.kv_cache.block_hashes, but for a whole batch in numpy. A prefix's hash is
    the sum (mod 2^64) of a mixed (token, position) value over its tokens, mixed once more with
    its length, so every prefix costs one cumulative sum. Only equality matters (rows with
    equal hashes share the prefix): the engine checks the tokens on every cache hit itself."""
    import numpy as np
    from libinfer.engine import BLOCK
    offsets = np.asarray(offsets, dtype=np.int64)
    n = np.diff(offsets)
    nb = n // BLOCK
    boff = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(nb, out=boff[1:])
    if boff[-1] == 0:
        return boff, np.zeros(0, dtype=np.int64)
    with np.errstate(over="ignore"):
        pos = np.arange(len(flat), dtype=np.int64) - np.repeat(offsets[:-1], n)
        x = _mix64(np.asarray(flat).astype(np.uint64) + np.uint64(1) + (pos.astype(np.uint64) << np.uint64(32)))
        cs = np.cumsum(x, dtype=np.uint64)
        owner = np.repeat(np.arange(len(n)), nb)
        k = np.arange(boff[-1], dtype=np.int64) - boff[owner]
        start = offsets[owner]
        end = start + BLOCK * (k + 1) - 1
        before = np.where(start > 0, cs[np.maximum(start - 1, 0)], np.uint64(0))
        h = _mix64((cs[end] - before) ^ ((k + 1).astype(np.uint64) * np.uint64(_M2)))
    return boff, h.view(np.int64)


def list_array(offsets, values, valid=None):
    """An Arrow list array from offsets and flat values; rows where `valid` is False are null."""
    import numpy as np
    import pyarrow as pa
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(values), mask=mask)


def encode(tok, texts: list[str]):
    """(offsets, flat int32 ids) of `texts`, with the special tokens tok(texts) adds: the
    Rust batch encoder when the tokenizer has one (no Python per token)."""
    import numpy as np
    import pyarrow as pa
    if not texts:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
    else:
        ids = tok(texts).input_ids
    arr = pa.array(ids, type=pa.list_(pa.int32()))
    return arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy(zero_copy_only=False)


class DictMerge(AccumulatorParam):
    """Accumulates {key: value}; a later value for a key replaces the earlier one. Tasks
    put their statistics under (pass, partition id), so a retried or recomputed task
    (Spark reruns lost partitions; the range partitioner's sampling job evaluates the
    family pass once more) replaces its entry instead of counting twice."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


def _partition_id() -> int:
    from pyspark import TaskContext
    ctx = TaskContext.get()
    return ctx.partitionId() if ctx else 0


def batch_waste_parts(lengths, batch: int) -> tuple[int, int]:
    """batch_padding in numpy: (real, padded-total) tokens of `lengths` cut, in order, into
    batches of `batch` rows, each padded to its longest row."""
    import numpy as np
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return 0, 0
    starts = np.arange(0, len(lengths), batch)
    sizes = np.diff(np.append(starts, len(lengths)))
    return int(lengths.sum()), int((np.maximum.reduceat(lengths, starts) * sizes).sum())


def prepare_batch(rows, values, data: dict, tok, context: int, batch_file: dict | None = None):
    """One Arrow batch of input records -> an Arrow batch of PARSED_SCHEMA (+ BATCH_SCHEMA):
    parse, clean, template, tokenize (one batch call), check lengths, hash blocks."""
    import numpy as np
    import pyarrow as pa
    ids, texts, reasons, raws, lines = [], [], [], [], []
    for row, value in zip(rows, values):
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
        ids.append(rid)
        texts.append(text if reason is None else None)
        reasons.append(reason)
        # openai_batch keeps every line (a later duplicate is found after this step).
        keep = reason is not None or batch_file is not None
        raws.append((raw if raw is not None else text) if keep else None)
    ok = np.array([r is None for r in reasons], dtype=bool)
    ok_idx = np.flatnonzero(ok)
    # Token ids of the usable rows; a batch line may bring its own (chat: the template's).
    given = {i: lines[i].token_ids for i in ok_idx if lines and lines[i].token_ids is not None}
    to_encode = [i for i in ok_idx if i not in given]
    enc_off, enc_flat = encode(tok, [texts[i] for i in to_encode])
    if given:   # rare (batch files): merge the given lists in row order
        seqs = dict(zip(to_encode, (enc_flat[a:b] for a, b in zip(enc_off[:-1], enc_off[1:]))))
        seqs.update({i: np.asarray(t, dtype=np.int32) for i, t in given.items()})
        parts = [seqs[i] for i in ok_idx]
        ok_lengths = np.array([len(p) for p in parts], dtype=np.int64)
        flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
    else:
        ok_lengths, flat = np.diff(enc_off), enc_flat
    n = np.zeros(len(reasons), dtype=np.int64)
    n[ok_idx] = ok_lengths
    for i in ok_idx[n[ok_idx] >= context]:
        reasons[i] = f"prompt too long: {n[i]} tokens >= model context {context}"
    for i in ok_idx[n[ok_idx] == 0]:
        reasons[i] = "empty prompt: it has no tokens"
    good = np.array([r is None for r in reasons], dtype=bool)
    for i in np.flatnonzero(ok & ~good):       # refused after tokenizing: keep what was read
        raws[i], texts[i] = raws[i] or texts[i], None
    # Keep only the good rows' ids: drop the refused rows' values from the flat array.
    if (ok & ~good).any():
        keep_tok = np.repeat(good[ok_idx], ok_lengths)
        flat = flat[keep_tok]
    n = np.where(good, n, 0)
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    boff, hashes = chain_hashes(offsets, flat)
    cols = {
        "row": pa.array(np.asarray(rows, dtype=np.int64)),
        "id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.string()),
        "token_ids": list_array(offsets, flat.astype(np.int32, copy=False), good),
        "n_tokens": pa.array(n.astype(np.int32), mask=~good),
        "blocks": list_array(boff, hashes, good),
        "reason": pa.array(reasons, pa.string()),
        "raw": pa.array(raws, pa.string()),
    }
    if batch_file is not None:
        cols.update({k: pa.array(v, pa.string()) for k, v in batch_columns(lines, reasons).items()})
    return pa.RecordBatch.from_pydict(cols)


def tokenize_only(data: dict, batch_file: dict | None) -> bool:
    """True when the rows need no chat template (none configured, no batch file whose
    chat lines render one): the torch-free encoder serves them (worker_tokenizer)."""
    return not data["chat_template"] and batch_file is None


def _prepare_arrow(data: dict, model: dict, fault: dict, batch_file: dict | None = None, stats=None,
                   batch: int = 1):
    """The mapInArrow function of the first pass (prepare_batch on every batch). With
    `stats` (a DictMerge accumulator) each task reports its rows and the padding of its
    usable rows' batches in arrival order."""
    def prepare(batches):
        import numpy as np
        from jobs._spark import worker_tokenizer
        pid = _partition_id()
        maybe_fail(fault, "preprocess", pid)
        tok, context = worker_tokenizer(model, light=tokenize_only(data, batch_file))
        rows_in = 0
        arrival = ([], [])     # (rows, n_tokens) of the usable rows
        for rb in batches:
            out = prepare_batch(rb.column("row").to_numpy(), rb.column("value").to_pylist(), data, tok, context,
                                batch_file)
            rows_in += out.num_rows
            n = out.column("n_tokens")
            good = n.is_valid().to_numpy(zero_copy_only=False)
            arrival[0].append(out.column("row").to_numpy()[good])
            arrival[1].append(n.to_numpy(zero_copy_only=False)[good])
            yield out
        if stats is not None:
            rows = np.concatenate(arrival[0]) if arrival[0] else np.zeros(0)
            lengths = np.concatenate(arrival[1]) if arrival[1] else np.zeros(0)
            stats.add({("parse", pid): {"rows": rows_in, "ok": len(lengths), "arrival": batch_waste_parts(
                lengths[np.argsort(rows, kind="stable")], batch)}})
    return prepare


def _prepare_fn(data: dict, model: dict, fault: dict, batch_file: dict | None = None):
    """The first pass for pandas callers (jobs.finetune's mapInPandas): the same rows as
    `_prepare_arrow`, as DataFrames (token_ids as numpy arrays)."""
    def prepare(batches):
        import pyarrow as pa
        arrow = _prepare_arrow(data, model, fault, batch_file)
        for pdf in batches:
            rb = pa.RecordBatch.from_pydict({"row": pa.array(pdf["row"].tolist(), pa.int64()),
                                             "value": pa.array(pdf["value"].tolist(), pa.binary())})
            for out in arrow(iter([rb])):
                yield out.to_pandas()
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


def duplicate_ids(parsed) -> list:
    """The ids more than one row has, each with (n rows, first row, usable rows among them,
    whether the first row is usable): a summary, the only rows that come to the driver."""
    from pyspark.sql import functions as F
    ok = F.col("reason").isNull().cast("int")
    return (parsed.filter(F.col("id").isNotNull()).groupBy("id")
            .agg(F.count(F.lit(1)).alias("n"), F.min("row").alias("first"), F.sum(ok).alias("ok"),
                 F.min_by(ok, "row").alias("first_ok"))
            .filter(F.col("n") > 1).collect())


def mark_duplicates(spark, parsed, dups: list, later_only: bool):
    """Refuse the rows of `dups` (a broadcast join: the rows never move). Duplicate ids are
    ambiguous: every row that shares an id goes to quarantine. A batch file's custom_id names
    one request (`later_only`): the first line that has it is that request (whatever becomes
    of it), every later line with it is refused."""
    from pyspark.sql import functions as F
    if not dups:
        return parsed
    d = spark.createDataFrame([(r["id"], r["n"], r["first"]) for r in dups], "id string, _n long, _first long")
    marked = parsed.join(F.broadcast(d), "id", "left")
    if later_only:
        from jobs import _batchfile
        later = F.col("_first").isNotNull() & (F.col("row") > F.col("_first"))
        reason = F.format_string("custom_id: duplicate of an earlier line (row %d); custom_id must be unique in "
                                 "the file", F.col("_first"))
        marked = (marked.withColumn("reason", F.when(later, reason).otherwise(F.col("reason")))
                  .withColumn("error", F.when(later, F.lit(_batchfile.DUPLICATE)).otherwise(F.col("error"))))
    else:
        dup = F.col("reason").isNull() & F.col("_n").isNotNull()
        marked = marked.withColumn("reason", F.when(dup, F.format_string("duplicate id: %d rows have it", F.col("_n")))
                                   .otherwise(F.col("reason")))
    return marked.drop("_n", "_first")


# ------------------------------------------------------------------ prefix families
#
# `blocks` holds a chain hash of each whole 16-token block of a row's token ids (the
# engine's prefix-cache blocks, `chain_hashes`): entry k stands for tokens [0, 16(k+1)).
# Counting the rows per hash gives the prefix trie of the corpus (c_k rows begin with this
# row's first k+1 blocks; c_k never grows with k). A row's family is the node on its own
# path that saves the most prefill when computed once for all the rows below it:
# argmax_k (c_k - 1) * (k + 1), ties to the shallower node. Why this node and not a fixed
# depth or the deepest shared block:
# - the hash of the first 1-4 blocks merges different tasks behind one common opening (a
#   chat template's system turn, a shared instruction line) into one family;
# - the deepest shared block splits a task into fragments: two queries that start with the
#   same words share one more block (the one across the header's end) than the rest of
#   their task, and would be a family of their own, in another partition;
# - the argmax lands on the end of the task's header for every row of the task (60 rows x
#   25 blocks saves far more than 3 rows x 26 or 240 rows x 1), whatever their query is.
# Cost: one explode of n_tokens/16 longs per row and a group-by on them, of which only the
# hashes that >= 2 rows share come to the driver (the shared nodes of the trie: a summary,
# broadcast back); each row's family is then picked in numpy inside the Arrow pass that feeds
# the range partitioner. Rows that share no block with any other row have no family (null)
# and are clustered by length after the families. A hash collision only misorders rows (the
# engine checks the tokens on every hit).

def shared_blocks(good):
    """(hashes, counts) of the blocks that >= 2 usable rows have, sorted by hash (numpy)."""
    import numpy as np
    from pyspark.sql import functions as F
    t = (good.select(F.explode("blocks").alias("h")).groupBy("h").count().filter(F.col("count") >= 2)
         .toArrow())
    order = np.argsort(t.column("h").to_numpy(), kind="stable")
    return t.column("h").to_numpy()[order], t.column("count").to_numpy()[order].astype(np.int64)


def family_columns(boff, hashes, keys, counts):
    """Per row of a batch (blocks as offsets `boff` + flat `hashes`; the shared blocks as
    sorted `keys` with their row `counts`): (has a family, family, root, shared blocks,
    reusable tokens). family = the chosen node's hash, root = the row's first block's hash,
    shared blocks = the blocks it shares with at least one other row, reusable = its share of
    the tokens a cache holding every shared block once would not compute (summed over rows:
    sum over nodes of 16 (c - 1))."""
    import numpy as np
    from libinfer.engine import BLOCK
    boff = np.asarray(boff, dtype=np.int64)
    nb = np.diff(boff)
    rows = len(nb)
    has, family, root = np.zeros(rows, bool), np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    shared_n, reusable = np.zeros(rows, np.int64), np.zeros(rows, np.float64)
    if not len(hashes) or not len(keys):
        return has, family, root, shared_n, reusable
    idx = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
    c = np.where(keys[idx] == hashes, counts[idx], 0)
    owner = np.repeat(np.arange(rows), nb)
    k = np.arange(len(hashes), dtype=np.int64) - boff[owner]
    shared = c >= 2
    # argmax_k (c_k - 1)(k + 1), ties to the shallower k: one key per block, unique in its row.
    key = np.where(shared, (c - 1) * (k + 1), 0) * (int(nb.max()) + 1) - k
    some = nb > 0
    starts = boff[:-1][some]
    best = np.full(rows, -1, dtype=np.int64)
    best[some] = np.maximum.reduceat(key, starts)
    at = np.flatnonzero(key == np.repeat(best, nb))       # one block per row with blocks
    family[some] = hashes[at]
    root[some] = hashes[starts]
    shared_n[some] = np.add.reduceat(shared.astype(np.int64), starts)
    reusable[some] = np.add.reduceat(np.where(shared, BLOCK * (c - 1) / np.maximum(c, 1), 0.0), starts)
    has = best > 0
    return has, family, root, shared_n, reusable


def local_families(blocks: list[list[int]]) -> list[int | None]:
    """The same family choice as `family_columns`, in plain Python (the tests' reference)."""
    from collections import Counter
    c = Counter(h for b in blocks for h in b)
    return [max(((c[h] - 1) * (k + 1), -k, h) for k, h in enumerate(b) if c[h] >= 2)[2]
            if b and c[b[0]] >= 2 else None for b in blocks]


def _iter_hints(tuples: bool) -> dict:
    """The type hints that make arrow_udf an iterator UDF (of column tuples, or of one column)."""
    from typing import Iterator, Tuple
    import pyarrow as pa
    return {"batches": Iterator[Tuple[pa.Array, ...]] if tuples else Iterator[pa.Array], "return": Iterator[pa.Array]}


def _families_udf(shared, stats, batch_file: bool):
    """The second pass, an iterator Arrow UDF of (blocks, n_tokens[, params]) -> struct
    (family, root, n_tokens): only those columns go to Python and back (the text and token
    ids stay in the JVM; the range partitioner's sampling job and the shuffle each run it
    once). n_tokens comes back as it went in and replaces the column, so that the UDF runs in
    every order (cluster_by=length does not read family or root, and Spark would prune it).
    Each task reports its (root, family, n_tokens) counts and family statistics to `stats`."""
    from pyspark.sql.functions import arrow_udf

    def families(batches):
        import numpy as np
        import pyarrow as pa
        from collections import Counter
        keys, counts = shared.value
        pid = _partition_id()
        hist, fams, params = Counter(), set(), set()
        shared_sum, reusable_sum = 0, 0.0
        for cols in batches:
            blocks, n = cols[0], cols[1].to_numpy(zero_copy_only=False).astype(np.int64)
            has, family, root, shared_n, reusable = family_columns(
                blocks.offsets.to_numpy(), blocks.values.to_numpy(), keys, counts)
            triples, tc = np.unique(np.stack([has.astype(np.int64), np.where(has, root, 0), np.where(has, family, 0),
                                              n], axis=1), axis=0, return_counts=True)
            for (h, r, f, length), cnt in zip(triples.tolist(), tc.tolist()):
                hist[(r if h else None, f if h else None, length)] += cnt
            fams.update(np.unique(family[has]).tolist())
            shared_sum += int(shared_n.sum())
            reusable_sum += float(reusable.sum())
            if batch_file:
                params.update(cols[2].unique().to_pylist())
            yield pa.StructArray.from_arrays([pa.array(family, mask=~has), pa.array(root, mask=~has), cols[1]],
                                             names=["family", "root", "n_tokens"])
        stats.add({("family", pid): {"hist": hist, "families": fams, "shared_blocks": shared_sum,
                                     "reusable": reusable_sum, "params": params}})
    families.__annotations__ = _iter_hints(tuples=True)
    return arrow_udf(families, "family long, root long, n_tokens int")


def n_partitions(spark, data: dict, n_rows: int, batch: int) -> int:
    if data["num_partitions"]:
        return data["num_partitions"]
    # A multiple of the task slots, up to 4 per slot (long clusters take longer: smaller
    # pieces balance the slots), but not so many that a partition holds less than a batch.
    slots = spark.sparkContext.defaultParallelism
    return slots * max(1, min(4, math.ceil(n_rows / (batch * slots))))


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


def _padding_udf(batch: int, stats):
    """An iterator Arrow UDF that returns n_tokens as it is, applied to the sorted partitions
    in front of the writer: it sees the lengths in the order they are written (only that
    column goes to Python), and the task reports the padding of its `batch`-row batches (the
    batches generate forms from this partition) to `stats`."""
    from pyspark.sql.functions import arrow_udf

    def padding(batches):
        import numpy as np
        pid = _partition_id()
        lengths = []
        for n in batches:
            lengths.append(n.to_numpy(zero_copy_only=False))
            yield n
        n = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        stats.add({("write", pid): {"rows": len(n), "padding": batch_waste_parts(n, batch)}})
    padding.__annotations__ = _iter_hints(tuples=False)
    return arrow_udf(padding, "int")


def modelled_padding(hist: dict, parts: int, batch: int, by_family: bool) -> float:
    """Padding waste of `cluster(.., "prefix" if by_family else "length")` from the
    (root, family, n_tokens) -> rows counts alone: the rows in the range partitioner's order
    cut into `parts` equal ranges (what its sampled bounds aim at), each sorted as
    sortWithinPartitions sorts it, cut into batches. Used for the orders the job did not
    write (the written one is measured)."""
    import numpy as np
    if not hist:
        return 0.0
    def family_key(root, family):
        return (root is None, root or 0, family or 0) if by_family else (False, 0, 0)
    items = sorted(hist.items(), key=lambda kv: (family_key(kv[0][0], kv[0][1]), -kv[0][2]))
    fams = {}
    group = np.array([fams.setdefault(family_key(r, f), len(fams)) for (r, f, _), _ in items], dtype=np.int64)
    counts = np.array([c for _, c in items], dtype=np.int64)
    g = np.repeat(group, counts)
    n = np.repeat(np.array([length for (_, _, length), _ in items], dtype=np.int64), counts)
    bounds = np.arange(parts + 1, dtype=np.int64) * len(n) // parts
    real = total = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        order = np.lexsort((n[a:b], g[a:b]))
        r, t = batch_waste_parts(n[a:b][order], batch)
        real, total = real + r, total + t
    return waste(real, total)


def peak_rss() -> dict:
    """Peak resident memory (VmHWM) of this driver process and of the Spark driver JVM it
    started (in local mode the JVM also runs the executors' task threads; the Python workers
    are separate processes)."""
    def hwm(pid) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0
    import resource
    out = {"driver_peak_rss_bytes": hwm("self") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        from pyspark import SparkContext
        proc = getattr(SparkContext._gateway, "proc", None)
        if proc is not None:
            import psutil
            jvm = [p for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                   if "java" in p.name()]
            if jvm:
                out["driver_jvm_peak_rss_bytes"] = hwm(jvm[0].pid)
    except Exception:  # noqa: BLE001 - a measurement, never a reason to fail the job
        pass
    return out


def single_process_baseline(data: dict, model: dict, n_total: int, mode: str) -> dict:
    """The same parse, clean, tokenize, dedupe, family, sort and write in this one process,
    without Spark (the talk's 2.3 compares its distributed preprocessing against exactly
    this), on the first `data.single_process_sample` records, streamed from the file; its
    time is scaled to the corpus' `n_total` records (exact when the corpus is no larger), so
    the driver holds the sample, never the corpus. The tokenizer's load is counted once."""
    import tempfile
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from collections import Counter
    from jobs._spark import worker_tokenizer
    t0 = time.perf_counter()
    tok, context = worker_tokenizer(model, light=tokenize_only(data, None))
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    sample = min(data["single_process_sample"], data["limit"] or n_total or 1)
    with open(data["path"], "rb") as f:
        lines = (line.rstrip(b"\n") for line in f)
        if data["format"] != "text":
            lines = (line for line in lines if line.strip())
        values = list(itertools.islice(lines, sample))
    outs = [prepare_batch(np.arange(i, i + len(values[i:i + 10_000])), values[i:i + 10_000], data, tok, context)
            for i in range(0, len(values), 10_000)]
    table = pa.Table.from_batches(outs) if outs else None
    if table is not None and table.num_rows:
        ids = table.column("id").to_pylist()
        seen = Counter(i for i in ids if i is not None)
        ok = np.array([r is None and seen[i] == 1 for r, i in zip(table.column("reason").to_pylist(), ids)])
        good = table.filter(pa.array(ok)).combine_chunks()
        blocks = good.column("blocks").chunk(0) if good.num_rows else None
        if blocks is not None:
            h, c = np.unique(blocks.values.to_numpy(), return_counts=True)
            has, family, root, _, _ = family_columns(blocks.offsets.to_numpy(), blocks.values.to_numpy(),
                                                     h[c >= 2], c[c >= 2])
            last = np.iinfo(np.int64).max          # nulls last
            n = good.column("n_tokens").to_numpy()
            _, id_rank = np.unique(np.array(good.column("id").to_pylist(), dtype=object), return_inverse=True)
            keys = {"prefix": (id_rank, n, np.where(has, family, last), np.where(has, root, last)),
                    "length": (id_rank, n), "none": (good.column("row").to_numpy(),)}[mode]
            good = good.take(pa.array(np.lexsort(keys))).select(CLUSTERED_COLUMNS)
            with tempfile.TemporaryDirectory() as tmp:
                pq.write_table(good, f"{tmp}/c.parquet")
    work = time.perf_counter() - t1
    rows = len(values)
    return {"single_process_s": load + work * (n_total / rows if rows else 1.0), "single_process_rows": rows,
            "single_process_rows_per_s": rows / work if work else 0.0}


def run_preprocess(spark, cfg, out: Output) -> dict:
    """Preprocess into out/clustered and out/quarantine; returns the metrics (phase seconds in
    metrics["_breakdown"]). The corpus is read in about 4 splits per task slot."""
    with sql_conf(spark, input_splits(spark)):
        return _run_preprocess(spark, cfg, out)


def _run_preprocess(spark, cfg, out: Output) -> dict:
    from collections import Counter
    from omegaconf import OmegaConf
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from libinfer.engine import BLOCK
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    fault = OmegaConf.to_container(cfg.fault, resolve=True)
    batch = model["max_batch_size"]
    batch_file = None
    if data["format"] == "openai_batch":
        from jobs import _batchfile
        batch_file = {"base": _batchfile.base_params(cfg), "seed": _batchfile.job_seed(cfg)}
        progress(f"preprocess: OpenAI batch file; defaults of a line: {data['batch_defaults']}; "
                 f"sampled lines without a seed get seed {batch_file['seed']}")
    from jobs._model import ensure_model
    ensure_model(cfg.model)   # a random-init test model is written here, not by racing workers
    sc = spark.sparkContext
    stats = sc.accumulator({}, DictMerge())
    phases: dict[str, float] = {}
    t0 = tp = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal tp
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - tp
        tp = now

    progress(f"preprocess: reading {data['path']} ({data['format']})")
    raw = read_corpus(spark, data)
    slots = sc.defaultParallelism
    if raw.rdd.getNumPartitions() < slots:   # a small file is one split: tokenize on every slot
        raw = raw.repartition(slots, "row")
    parsed = raw.mapInArrow(_prepare_arrow(data, model, fault, batch_file, stats, batch),
                            PARSED_SCHEMA + (BATCH_SCHEMA if batch_file else ""))
    # On local disk: three passes read it, and kept in memory first (MEMORY_AND_DISK) the
    # tokenized rows of a million-row corpus ran the 2 GiB driver JVM of local[2] out of heap.
    parsed = parsed.persist(StorageLevel.DISK_ONLY)
    extra = _batchfile.CLUSTERED_EXTRA if batch_file else []
    shared = None
    try:
        # Pass 1 (cached): parse + tokenize; its first job also finds the duplicate ids.
        dups = duplicate_ids(parsed)
        phase("read_parse_tokenize")
        parse = [v for k, v in stats.value.items() if k[0] == "parse"]
        rows_read = sum(p["rows"] for p in parse)
        n_ok = sum(p["ok"] for p in parse) - sum((r["ok"] - r["first_ok"]) if batch_file else r["ok"] for r in dups)
        progress(f"preprocess: {rows_read} rows read and tokenized, {n_ok} usable, {rows_read - n_ok} to quarantine "
                 f"({len(dups)} ids repeated)")
        marked = mark_duplicates(spark, parsed, dups, later_only=batch_file is not None)
        good = marked.filter(F.col("reason").isNull()).select(*CLUSTERED_COLUMNS, "blocks", *extra)
        keys, counts = shared_blocks(good)
        shared = sc.broadcast((keys, counts))
        phase("families")
        progress(f"preprocess: {len(keys)} blocks shared by >= 2 rows; clustering and writing")
        parts = n_partitions(spark, data, n_ok, batch)
        mode = _config.cluster_by(data)
        fam_in = ["blocks", "n_tokens"] + (["params"] if batch_file else [])
        keyed = (good.withColumn("_fr", _families_udf(shared, stats, batch_file is not None)(*fam_in))
                 .withColumn("n_tokens", F.col("_fr.n_tokens"))
                 .select(*CLUSTERED_COLUMNS, *extra, "_fr.family", "_fr.root"))
        clustered = cluster(keyed, parts, mode).select(*CLUSTERED_COLUMNS, *extra)
        out.commit(clustered.withColumn("n_tokens", _padding_udf(batch, stats)("n_tokens")), "clustered")
        phase("cluster_write")
        bad = marked.filter(F.col("reason").isNotNull()).select(
            "id", "row", F.lit("preprocess").alias("stage"), "reason", F.coalesce("raw", "text").alias("raw"),
            *(["error"] if batch_file else []))
        out.commit(bad, "quarantine")
        out.mark_complete("clustered")
        phase("quarantine_write")
        wall = time.perf_counter() - t0

        # Statistics: from the accumulators of the passes above, no Spark job.
        st = stats.value
        fam = [v for k, v in st.items() if k[0] == "family"]
        written = [v for k, v in st.items() if k[0] == "write"]
        hist3 = Counter()
        for f in fam:
            hist3.update(f["hist"])
        lengths = Counter()
        for (_, _, n), c in hist3.items():
            lengths[n] += c
        hist = sorted(lengths.items())
        n_out = sum(w["rows"] for w in written)
        if n_out != sum(lengths.values()) or n_out != n_ok:
            raise RuntimeError(f"preprocess: {n_out} rows written to clustered/ but {n_ok} usable rows counted")
        prompt_tokens = sum(n * c for n, c in hist)
        shared_tokens = BLOCK * sum(f["shared_blocks"] for f in fam)
        metrics = {
            "rows_in": rows_read, "rows_out": n_ok, "rows_quarantined": rows_read - n_ok,
            "prompt_tokens": prompt_tokens, "partitions": parts, "cluster_by": mode,
            "wall_s": wall, "rows_per_s": rows_read / wall if wall else 0.0,
            "tokens_min": hist[0][0] if hist else 0, "tokens_max": hist[-1][0] if hist else 0,
            # Few-shot headers: families, prompt tokens in blocks that >= 2 rows share, and the
            # part of them a cache holding each shared block once need not compute.
            "prefix_families": len(set().union(*(f["families"] for f in fam))),
            "prefix_shared_tokens": shared_tokens,
            "prefix_shared_share": shared_tokens / prompt_tokens if prompt_tokens else 0.0,
            "prefix_reusable_tokens": round(sum(f["reusable"] for f in fam)),
            # The batches generate forms from the written partitions (measured on the way to
            # the writer), and from the other orders (modelled from the counts; arrival order
            # measured on the input partitions).
            "padding_waste": waste(sum(w["padding"][0] for w in written), sum(w["padding"][1] for w in written)),
        }
        arrival = waste(sum(p["arrival"][0] for p in parse), sum(p["arrival"][1] for p in parse))
        for other, name in (("prefix", "prefix"), ("length", "sorted"), ("none", "unsorted")):
            metrics[f"padding_waste_{name}"] = (metrics["padding_waste"] if other == mode else arrival
                                                if other == "none" else
                                                modelled_padding(hist3, parts, batch, by_family=other == "prefix"))
        if batch_file:
            metrics["param_sets"] = len(set().union(*(f["params"] for f in fam)) - {None})
        metrics["_histogram"] = hist
        phase("stats")
        local = "://" not in str(data["path"]) and os.path.isfile(str(data["path"]))
        if cfg.compare_single_process and local and data["format"] in ("jsonl", "text"):
            single = single_process_baseline(data, model, rows_read, mode)
            metrics.update(single, speedup_vs_single_process=single["single_process_s"] / wall)
            scaled = (f", scaled from its first {single['single_process_rows']} rows"
                      if single["single_process_rows"] < rows_read else "")
            progress(f"preprocess: one process without Spark takes {single['single_process_s']:.1f}s{scaled}: "
                     f"Spark is {single['single_process_s'] / wall:.2f}x that on {slots} task slots")
            phase("single_process")
        metrics.update(peak_rss())
        metrics["_breakdown"] = dict(phases)
        progress(f"preprocess: {n_ok} rows -> {out.path('clustered')} ({parts} partitions, cluster_by={mode}), "
                 f"{rows_read - n_ok} -> {out.path('quarantine')}; {metrics['rows_per_s']:.1f} rows/s; "
                 f"{prefix_line(metrics)}; {padding_line(metrics, batch)}")
        progress(f"preprocess: {breakdown_line(phases)}; driver peak RSS {memory_line(metrics)}")
        return metrics
    finally:
        parsed.unpersist()
        if shared is not None:
            shared.unpersist()


def breakdown_line(phases: dict) -> str:
    return "phases " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())


def memory_line(m: dict) -> str:
    jvm = m.get("driver_jvm_peak_rss_bytes")
    return f"{m['driver_peak_rss_bytes'] / 2**20:.0f} MiB (Python)" + (
        f", {jvm / 2**20:.0f} MiB (JVM, with local executors' heap)" if jvm else "")


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
