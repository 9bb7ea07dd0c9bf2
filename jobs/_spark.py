"""Spark glue shared by the jobs: the session from the `spark` group, output directories
committed atomically through Hadoop's FileSystem, executor-side caches (tokenizer,
generator), fault injection for the exactly-once tests, and the entry-point wrapper that
turns a bad path or config into one clear line and a non-zero exit."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
import traceback
import uuid

log = logging.getLogger("jobs")


class JobError(RuntimeError):
    """A problem the user can fix (a path, an existing output); printed as one line."""


# ------------------------------------------------------------------ entry points

def entry_point(fn):
    """Wrap a Hydra task function: expected errors become `error: ...` and exit 2;
    anything else prints its traceback and a last line saying what failed, exit 1."""
    @functools.wraps(fn)
    def wrapper(cfg):
        from libinfer import ModelLoadError
        from ._config import ConfigError
        try:
            return fn(cfg)
        except (JobError, ConfigError, ModelLoadError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line must say what failed
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:500]
            print(f"error: {fn.__module__} failed: {type(e).__name__}: {first}", file=sys.stderr)
            sys.exit(1)
    return wrapper


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------- session

def _local_with_retries(master: str, max_failures: int) -> str:
    """local masters do not retry failed tasks unless asked: local[N] -> local[N,F]."""
    if master == "local":
        return f"local[1,{max_failures}]"
    m = re.fullmatch(r"local\[([0-9]+|\*)\]", master)
    return f"local[{m.group(1)},{max_failures}]" if m else master


def session(cfg, app_suffix: str = ""):
    """The SparkSession of the `spark` config group (reuses one that spark-submit started)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from jobs._tracking import warm_up
    warm_up(cfg)           # MLflow's import and store, while the JVM starts
    from pyspark.sql import SparkSession
    s = cfg.spark
    b = SparkSession.builder.appName(s.app_name + app_suffix)
    b = b.master(_local_with_retries(s.master, s.task_max_failures))
    settings = {
        "spark.submit.deployMode": s.deploy_mode,
        "spark.driver.memory": s.driver_memory,
        "spark.executor.memory": s.executor_memory,
        "spark.executor.cores": str(s.executor_cores),
        "spark.task.cpus": str(s.task_cpus),
        "spark.task.maxFailures": str(s.task_max_failures),
        # One Python worker per task slot lives across tasks: the model is loaded once in it.
        "spark.python.worker.reuse": "true",
        "spark.executorEnv.PYSPARK_PYTHON": os.environ["PYSPARK_PYTHON"],
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Read each clustered Parquet file as its own partition (never pack clusters together).
        "spark.sql.files.openCostInBytes": str(128 * 2**20),
        "spark.sql.session.timeZone": "UTC",
        # Let adaptive execution shrink the 200 default shuffle partitions under cached plans too.
        "spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": "true",
        "spark.ui.showConsoleProgress": "true",
    }
    if s.executor_instances:
        settings["spark.executor.instances"] = str(s.executor_instances)
    settings.update({k: str(v) for k, v in s.conf.items()})
    for k, v in settings.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel(s.log_level)
    return spark


@contextlib.contextmanager
def sql_conf(spark, settings: dict):
    """Runtime SQL settings for the actions inside the block, the session's own afterwards (a
    pipeline runs preprocess and generate in one session and they read files differently)."""
    old = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, str(v))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def input_splits(spark) -> dict:
    """SQL settings that cut an input file into about 4 splits per task slot, of 32 MiB at
    most (Spark's own rule: min(maxPartitionBytes, max(openCostInBytes, total bytes /
    minPartitionNum))). The session's openCostInBytes of 128 MiB keeps each clustered file one
    partition for generate; on the corpus it makes 128 MiB splits, e.g. 3 for 278 MB on 2 slots
    (the third running alone). The 32 MiB cap keeps a large corpus in many small tasks (a short
    tail, a bounded working set per task); the million-row run was measured with it."""
    slots = spark.sparkContext.defaultParallelism
    return {"spark.sql.files.openCostInBytes": 4 * 2**20, "spark.sql.files.minPartitionNum": 4 * slots,
            "spark.sql.files.maxPartitionBytes": 32 * 2**20}


# ------------------------------------------------------------------------ output

class Output:
    """Files under one output directory through Hadoop's FileSystem (file://, hdfs://, ...).

    A dataset directory (results/, quarantine/, clustered/) only ever receives whole Parquet
    files, moved in from a staging directory after Spark's committer finished the write (so
    a failed or retried task never leaves a file there), and `_SUCCESS` when the job is done.
    """

    def __init__(self, spark, root: str):
        jvm = spark._jvm
        self._jvm, self.spark = jvm, spark
        self.root = root.rstrip("/")
        self._Path = jvm.org.apache.hadoop.fs.Path
        self.fs = self._Path(self.root).getFileSystem(spark._jsc.hadoopConfiguration())

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._Path(self.path(*parts)))

    def delete(self, *parts: str) -> None:
        self.fs.delete(self._Path(self.path(*parts)), True)

    def data_files(self, *parts: str) -> list[str]:
        p = self._Path(self.path(*parts))
        if not self.fs.exists(p):
            return []
        return sorted(st.getPath().getName() for st in self.fs.listStatus(p)
                      if st.isFile() and not st.getPath().getName().startswith(("_", ".")))

    def has_data(self, *parts: str) -> bool:
        return bool(self.data_files(*parts))

    def complete(self, name: str) -> bool:
        return self.exists(name, "_SUCCESS")

    def mark_complete(self, name: str) -> None:
        self.fs.mkdirs(self._Path(self.path(name)))
        self.fs.create(self._Path(self.path(name, "_SUCCESS")), True).close()

    def unmark_complete(self, name: str) -> None:
        if self.exists(name, "_SUCCESS"):
            self.delete(name, "_SUCCESS")

    def commit(self, df, name: str) -> int:
        """Write `df` as Parquet into dataset `name`: Spark writes it to a staging dir,
        then its files are moved in. Returns the number of files moved."""
        rel = f"_staging/{name}-{uuid.uuid4().hex[:12]}"
        staging = self.path(rel)
        try:
            df.write.mode("errorifexists").parquet(staging)
            self.fs.mkdirs(self._Path(self.path(name)))
            moved = 0
            for st in self.fs.listStatus(self._Path(staging)):
                fname = st.getPath().getName()
                if st.isFile() and not fname.startswith(("_", ".")):
                    if not self.fs.rename(st.getPath(), self._Path(self.path(name, fname))):
                        raise JobError(f"cannot move {fname} into {self.path(name)}")
                    moved += 1
            return moved
        finally:
            self.drop_staging(rel)

    def drop_staging(self, rel: str) -> None:
        """Delete the staging directory `rel` (relative to root), and _staging/ itself once
        nothing else is staged there."""
        self.fs.delete(self._Path(self.path(rel)), True)
        staging_root = self._Path(self.path("_staging"))
        if self.fs.exists(staging_root) and not self.fs.listStatus(staging_root):
            self.fs.delete(staging_root, True)

    def uri(self, *parts: str) -> str:
        """The fully qualified URI of a path (file:/abs/..., hdfs://...): what executors open."""
        return self.fs.makeQualified(self._Path(self.path(*parts))).toUri().toString()

    def move_in(self, files: list[str], name: str) -> int:
        """Move whole files (qualified URIs, e.g. a task's staging files) into dataset `name`
        under their own names. A rename is atomic, so a reader sees a file whole or not at all."""
        self.fs.mkdirs(self._Path(self.path(name)))
        for f in files:
            src = self._Path(f)
            if not self.fs.rename(src, self._Path(self.path(name, src.getName()))):
                raise JobError(f"cannot move {f} into {self.path(name)}")
        return len(files)

    def parquet_rows(self, *parts: str) -> int:
        """Rows of one Parquet file, from its footer (read on the driver, no Spark job)."""
        footer = self._jvm.org.apache.parquet.hadoop.ParquetFileReader.readFooter(
            self.spark._jsc.hadoopConfiguration(), self._Path(self.path(*parts)))
        return sum(b.getRowCount() for b in footer.getBlocks())

    def copy_in(self, src: "Output", src_name: str, name: str, prefix: str) -> int:
        """Copy the Parquet files of `src`'s dataset `src_name` that hold rows into dataset
        `name` as `prefix` + their names (written under a hidden name, then renamed). No
        Spark job."""
        files = [f for f in src.data_files(src_name) if src.parquet_rows(src_name, f) > 0]
        util = self._jvm.org.apache.hadoop.fs.FileUtil
        conf = self.spark._jsc.hadoopConfiguration()
        self.fs.mkdirs(self._Path(self.path(name)))
        for fname in files:
            tmp = self._Path(self.path(name, f".{prefix}{fname}.{uuid.uuid4().hex[:8]}"))
            util.copy(src.fs, src._Path(src.path(src_name, fname)), self.fs, tmp, False, conf)
            if not self.fs.rename(tmp, self._Path(self.path(name, prefix + fname))):
                raise JobError(f"cannot copy {fname} into {self.path(name)}")
        return len(files)

    def read(self, name: str):
        """The committed rows of dataset `name` (None when it has no files yet)."""
        if not self.has_data(name):
            return None
        return self.spark.read.parquet(self.path(name))

    def write_lines(self, name: str, lines, chunk_bytes: int = 1 << 20) -> int:
        """Write text lines into the one file `name` (e.g. "openai/output.jsonl"), replacing
        it whole: written under a hidden name, then renamed. Returns the number of lines."""
        fs = self.fs.getRawFileSystem() if self.fs.getScheme() == "file" else self.fs   # no .crc files
        final = self._Path(self.path(name))
        tmp = self._Path(final.getParent(), f".{final.getName()}.{uuid.uuid4().hex[:12]}")
        stream, n, buf, size = fs.create(tmp, True), 0, [], 0
        try:
            for line in lines:
                b = line.encode("utf-8") + b"\n"
                buf.append(b)
                size, n = size + len(b), n + 1
                if size >= chunk_bytes:
                    stream.write(bytearray(b"".join(buf)))
                    buf, size = [], 0
            if buf:
                stream.write(bytearray(b"".join(buf)))
            stream.close()
            fs.delete(final, False)
            if not fs.rename(tmp, final):
                raise JobError(f"cannot move {tmp} to {final}")
        finally:
            if fs.exists(tmp):
                fs.delete(tmp, False)
        return n


def prepare_output(out: Output, names: list[str], resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing output unless resume/overwrite says how."""
    existing = [n for n in names if out.has_data(n)]
    if existing and overwrite and not resume:
        for n in [*names, "_staging"]:
            out.delete(n)
    elif existing and not resume:
        raise JobError(f"{out.path(existing[0])} already holds output and overwrite=false; pass resume=true "
                       f"to finish it or overwrite=true to replace it")
    for n in names:
        out.unmark_complete(n)


# ------------------------------------------------------------ executor side state

_CACHE: dict[str, object] = {}   # per Python worker process: tokenizers, generators


def model_key(model_dict: dict) -> str:
    return json.dumps(model_dict, sort_keys=True, default=str)


def worker_tokenizer(model_dict: dict, light: bool = False):
    """(tokenizer, context length) of the model, built once per Python worker. `light`: a
    caller that only batch-encodes takes the torch-free encoder of the tokenizer cache
    (libinfer.loading.tokenizer.fast_tokenizer) when an earlier full load on this machine
    left one; otherwise, and for chat templates, the model's full HF tokenizer."""
    key = f"tok:{light}:" + model_key(model_dict)
    if key not in _CACHE:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loaded = None
        if light:
            from libinfer.loading.tokenizer import fast_tokenizer
            loaded = fast_tokenizer(model_dict.get("path"), model_dict.get("gguf_file"))
        if loaded is None:
            from libinfer import Checkpoint
            from omegaconf import OmegaConf
            from ._model import ensure_model
            m = OmegaConf.create(model_dict)
            ensure_model(m)
            ckpt = Checkpoint.open(m.path, m.gguf_file)
            loaded = (ckpt.load_tokenizer(), ckpt.config.max_position)
        _CACHE[key] = loaded
    return _CACHE[key]


def worker_generator(model_dict: dict, threads: int):
    """The Generator of this Python worker, built on first use and kept for later tasks
    (like predict_batch_udf's model cache); returns (generator, load seconds or 0 if cached)."""
    import torch
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    key = "gen:" + model_key(model_dict)
    if key in _CACHE:
        return _CACHE[key], 0.0
    from omegaconf import OmegaConf
    from ._model import build_generator
    t0 = time.perf_counter()
    gen = build_generator(OmegaConf.create(model_dict))
    _CACHE[key] = gen
    return gen, time.perf_counter() - t0


class TaskFiles:
    """Executor side: Parquet files a task writes itself under a staging URI (pyarrow's
    filesystems: local or shared paths, hdfs://, s3://, gs://), one file per kind, opened
    on its first row, so an empty kind leaves no file. The driver moves the files that the
    successful attempts reported (collect returns exactly one attempt per partition); a
    failed or lost attempt's files stay in staging and are deleted with it."""

    def __init__(self, staging_uri: str, schemas: dict):
        from pyarrow import fs
        self.fs, self.root = fs.FileSystem.from_uri(staging_uri)
        self.staging_uri = staging_uri.rstrip("/")
        self.schemas, self.writers, self.rows, self.write_s = schemas, {}, {}, 0.0
        self.tag = uuid.uuid4().hex[:12]

    def mark_attempt(self, part: int, attempt: int) -> None:
        """An empty marker per started attempt: the driver counts partitions seen more than once."""
        self.fs.create_dir(f"{self.root}/_attempts", recursive=True)
        self.fs.open_output_stream(f"{self.root}/_attempts/{part}-{attempt}-{self.tag}").close()

    def write(self, kind: str, part: int, columns: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        n = len(next(iter(columns.values())))
        if not n:
            return
        t0 = time.perf_counter()
        if kind not in self.writers:
            self.fs.create_dir(f"{self.root}/{kind}", recursive=True)
            name = f"{kind}/part-{part:05d}-{self.tag}.parquet"
            self.writers[kind] = (pq.ParquetWriter(f"{self.root}/{name}", self.schemas[kind], filesystem=self.fs),
                                  name)
            self.rows[kind] = 0
        self.writers[kind][0].write_table(pa.Table.from_pydict(columns, schema=self.schemas[kind]))
        self.rows[kind] += n
        self.write_s += time.perf_counter() - t0

    def close(self) -> list[tuple[str, str, int]]:
        """(kind, file URI, rows) of every file written."""
        t0 = time.perf_counter()
        for w, _ in self.writers.values():
            w.close()
        self.write_s += time.perf_counter() - t0
        return [(k, f"{self.staging_uri}/{name}", self.rows[k]) for k, (_, name) in self.writers.items()]


def maybe_fail(fault: dict, stage: str, part: int) -> None:
    """Fault injection: the task of partition `fault.fail_partition` raises on its first
    `fault.attempts` attempts, so Spark's retry (or a resumed run) has to make up for it."""
    if fault.get("stage") != stage or fault.get("fail_partition", -1) != part:
        return
    from pyspark import TaskContext
    ctx = TaskContext.get()
    attempt = ctx.attemptNumber() if ctx else 0
    if attempt < fault.get("attempts", 1):
        raise RuntimeError(f"injected fault: {stage} partition {part}, attempt {attempt}")


# ------------------------------------------------------------------- measurements

def batch_padding(lengths, batch_size: int) -> tuple[int, int]:
    """(real, padded-total) tokens when `lengths` are cut, in order, into batches of
    `batch_size` rows, each padded to its longest row."""
    real = total = 0
    lengths = list(lengths)
    for i in range(0, len(lengths), batch_size):
        b = lengths[i:i + batch_size]
        real += sum(b)
        total += len(b) * max(b)
    return real, total


def waste(real: int, total: int) -> float:
    return 1.0 - real / total if total else 0.0


class Breakdown:
    """Where a job's wall time went: phases in seconds, printed with their share of the
    wall at the end of the job and logged to MLflow as time.<phase>_s."""

    def __init__(self, phases: dict | None = None):
        self.phases: dict[str, float] = dict(phases or {})

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def update(self, phases: dict, prefix: str = "") -> None:
        for k, v in phases.items():
            self.add(prefix + k, v)

    def lines(self, wall_s: float) -> list[str]:
        """One line per phase, then what no phase covers ("other")."""
        rows = list(self.phases.items()) + [("other", max(0.0, wall_s - sum(self.phases.values())))]
        width = max(len(k) for k, _ in rows)
        return [f"time: {k:<{width}} {v:8.2f}s {100 * v / wall_s if wall_s else 0:5.1f}%" for k, v in rows] + \
            [f"time: {'wall':<{width}} {wall_s:8.2f}s"]

    def metrics(self, wall_s: float) -> dict[str, float]:
        m = {f"time.{k}_s": v for k, v in self.phases.items()}
        m["time.other_s"] = max(0.0, wall_s - sum(self.phases.values()))
        m["time.wall_s"] = wall_s
        return m


def process_age_s() -> float:
    """Seconds since this process started (Python, imports and Hydra before the job's code)."""
    import psutil
    return max(0.0, time.time() - psutil.Process().create_time())
