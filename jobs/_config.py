"""Structured configs (dataclasses) for the Hydra config groups, registered in Hydra's
ConfigStore so that a misspelled key or a wrongly typed value fails at start, naming it.

Types are checked by OmegaConf while Hydra composes the config; values (enumerations,
ranges, the generation parameters) by `validate`, which every job calls first.

    from jobs._config import ModelConf, MlflowConf, validate, ConfigError
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the key's dotted name."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config '{key}': {message}")
        self.key = key


# --------------------------------------------------------------------------- groups

@dataclass
class RandomInitConf:
    """Shape of a random-initialised Llama written on first use (tests)."""
    hidden_size: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate_size: int = 256
    seed: int = 0


@dataclass
class ModelConf:
    """conf/model/*.yaml: which checkpoint and how the generator runs it."""
    name: str = MISSING
    path: Optional[str] = None          # null = the bundled SmolLM2 GGUF
    gguf_file: Optional[str] = None
    dtype: str = "float32"              # float32 | bfloat16 | float16
    quantization: str = "none"          # none | int8 | int4: weight-only, CPU + bfloat16 (layers/linear.py)
    device: str = "cpu"                 # cpu | cuda | cuda:N
    tp_size: int = 1
    max_batch_size: int = 64            # KV-cache slots (rows decoded together)
    max_batch_tokens: int = 2048        # prompt tokens per prefill step
    kv_cache_gb: float = 4.0
    prefix_cache: bool = True           # rows sharing leading 16-token blocks share their K/V (false: off)
    random_init: Optional[RandomInitConf] = None


@dataclass
class GenerationConf:
    """conf/generation/*.yaml: exactly the fields of libinfer.GenerationParams."""
    temperature: float = 1.0
    out_seq_length: int = 32
    recompute: bool = False
    greedy: bool = False
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_sequences: List[str] = field(default_factory=list)
    start: str = ""
    restart: str = ""
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: Optional[int] = None
    n: int = 1
    logprobs: Optional[int] = None
    guided_json: Any = None                 # a JSON schema: a mapping, JSON text, or the path of a .json file
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None


@dataclass
class CleanConf:
    """Text normalisation applied by jobs.preprocess before tokenizing."""
    unicode_form: Optional[str] = "NFC"     # NFC | NFKC | NFD | NFKD | null (off)
    strip_control: bool = True              # drop control chars except \n and \t
    collapse_whitespace: bool = True        # runs of spaces/tabs -> one space; keep newlines
    strip: bool = True                      # trim both ends


@dataclass
class DataConf:
    """conf/data/*.yaml: the input corpus and how preprocess reads and clusters it."""
    path: Optional[str] = None              # file or directory; jsonl | parquet | text | openai_batch
    format: str = "jsonl"                   # jsonl | parquet | text (one prompt a line, id = line number) | openai_batch
    batch_defaults: str = "openai"          # openai_batch: a line's missing fields from openai's defaults | generation
    id_column: str = "id"
    text_column: str = "prompt"
    clean: CleanConf = field(default_factory=CleanConf)
    max_chars: int = 100_000                # longer rows are quarantined before tokenizing
    template: Optional[str] = None          # e.g. "Q: {text}\nA:"; null = the text as is
    chat_template: bool = False             # wrap the text as one user turn of the tokenizer's template
    cluster_by: str = "prefix"              # prefix (shared leading blocks, by length inside) | length | none
    sort_by_length: Optional[bool] = None   # deprecated: true = cluster_by=length, false = cluster_by=none
    num_partitions: int = 0                 # 0 = spark.default.parallelism
    limit: int = 0                          # 0 = all rows (demo/tests: the first N)
    single_process_sample: int = 20_000     # compare_single_process: rows timed in one process, scaled to the corpus


@dataclass
class SparkConf:
    """conf/spark/*.yaml: where the job runs and what each task holds."""
    master: str = "local[*]"
    app_name: str = "spark-llm-batch"
    deploy_mode: str = "client"
    driver_memory: str = "2g"
    executor_memory: str = "2g"
    executor_cores: int = 1
    executor_instances: Optional[int] = None    # yarn/k8s: executors to ask for
    task_cpus: int = 1                      # cores a generate task holds = torch threads
    task_max_failures: int = 4              # attempts per task (local[N,F] on local masters)
    log_level: str = "WARN"
    conf: Dict[str, str] = field(default_factory=dict)   # any other spark.* setting, verbatim


@dataclass
class MlflowConf:
    """conf/mlflow/*.yaml: where runs are tracked."""
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "spark-llm-batch"
    run_name: Optional[str] = None


@dataclass
class FaultConf:
    """Fault injection for the exactly-once tests: the task of partition K raises on its
    first attempt only, so Spark's retry must produce the same rows."""
    fail_partition: int = -1                # -1 = off
    stage: str = "generate"                 # preprocess | generate
    attempts: int = 1                       # attempts that fail (>= spark.task_max_failures: the job fails)


@dataclass
class CostConf:
    """What the executors cost (libinfer.lab.cost): the job summary's cost per 1M prompts and
    per 1M generated tokens, jobs.compare's cost columns and jobs.plan's answer."""
    usd_per_hour: Optional[float] = None    # one executor's price per hour; null = rates[kind] x its units
    kind: str = "auto"                      # auto (gpu when model.device is cuda, else cpu) | a key of rates
    executors: Optional[int] = None         # executors billed; null = the run's (see libinfer/lab/cost.py)
    # USD per hour per unit: one vCPU for "cpu", one GPU for the others. Rough cloud
    # on-demand list prices to start from, not quotes: set yours (cost.rates.cpu=0.03, +cost.rates.l4=0.8).
    rates: Dict[str, float] = field(default_factory=lambda: {"cpu": 0.048, "gpu": 1.0})


# Top-level keys. `in` is a Python keyword, so the root schema is a DictConfig holding the
# typed group nodes rather than one dataclass.
ROOT_KEYS: dict[str, Any] = {
    "in": None,                 # jobs.generate: the preprocess output directory
    "out": "outputs/run",       # job output directory
    "resume": False,            # skip ids already in out/results (out/quarantine)
    "overwrite": True,          # replace an existing output (false: refuse to touch it)
    "chunk_rows": 256,          # rows per generate call inside a partition
    "waves": 1,                 # generate commits its output in this many steps (resume granularity)
    "compare_single_process": False,   # preprocess: also time the same work in one process, no Spark
    "run_date": None,           # YYYY-MM-DD or "today" (UTC): out (and generate's in) get /dt=YYYY-MM-DD
    "fault": OmegaConf.structured(FaultConf),
    "cost": OmegaConf.structured(CostConf),
}


def root_schema() -> DictConfig:
    return OmegaConf.create({
        "model": OmegaConf.structured(ModelConf),
        "data": OmegaConf.structured(DataConf),
        "generation": OmegaConf.structured(GenerationConf),
        "spark": OmegaConf.structured(SparkConf),
        "mlflow": OmegaConf.structured(MlflowConf),
        **ROOT_KEYS,
    })


def register() -> None:
    """conf/config.yaml lists `job_schema` first in its defaults."""
    ConfigStore.instance().store(name="job_schema", node=root_schema())


register()


# ---------------------------------------------------------------------- validation

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")
FORMATS = ("jsonl", "parquet", "text", "openai_batch")
BATCH_DEFAULTS = ("openai", "generation")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
CLUSTER_BY = ("prefix", "length", "none")


def cluster_by(data) -> str:
    """The effective data.cluster_by (the deprecated data.sort_by_length wins when set)."""
    old = data.get("sort_by_length")
    return data["cluster_by"] if old is None else ("length" if old else "none")


def _check(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def generation_params(gen_cfg):
    """libinfer.GenerationParams of the `generation` group; ParamError -> ConfigError."""
    from libinfer import GenerationParams, ParamError
    values = OmegaConf.to_container(gen_cfg, resolve=True) if isinstance(gen_cfg, DictConfig) else dict(gen_cfg)
    schema = values.get("guided_json")
    if isinstance(schema, str) and not schema.lstrip().startswith("{"):
        try:
            values["guided_json"] = Path(schema).expanduser().read_text()
        except OSError as e:
            raise ConfigError("generation.guided_json", f"is neither a JSON schema nor a readable file: {e}") from None
    try:
        return GenerationParams.from_dict(values)
    except ParamError as e:
        raise ConfigError(f"generation.{e.field}", str(e).split(": ", 1)[-1]) from None


GROUPS = {"model": ModelConf, "data": DataConf, "generation": GenerationConf, "spark": SparkConf,
          "mlflow": MlflowConf, "fault": FaultConf, "cost": CostConf}


def parse_run_date(value) -> Optional[str]:
    """`run_date` as YYYY-MM-DD: null stays null, "today" is today's UTC date."""
    import datetime as dt
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() == "today":
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ConfigError("run_date", f"must be a date YYYY-MM-DD, 'today' or null (got {text!r})") from None


def dated(path: str, date: str, key: str) -> str:
    """PATH -> PATH/dt=DATE; unchanged when PATH already ends in dt=DATE (validate may run twice)."""
    root = str(path).rstrip("/")
    last = root.rsplit("/", 1)[-1]
    if last == f"dt={date}":
        return root
    if last.startswith("dt=") and key == "out":
        raise ConfigError("out", f"already ends in {last} but run_date={date}: give out the undated root "
                                 f"({root.rsplit('/', 1)[0]}), the job adds dt={date}")
    if last.startswith("dt="):      # `in` naming one date explicitly (e.g. yesterday's preprocess output)
        return root
    return f"{root}/dt={date}"


def resolve_run_date(cfg) -> None:
    """run_date set: cfg.run_date becomes the date, cfg.out OUT/dt=DATE, and a `in` given as a
    dated root (jobs.preprocess run_date=DATE out=ROOT) ROOT/dt=DATE."""
    if "run_date" not in cfg:
        return
    date = parse_run_date(cfg.run_date)
    if date is None:
        return
    cfg.run_date = date
    if cfg.get("out"):
        cfg.out = dated(cfg.out, date, "out")
    if cfg.get("in"):
        cfg["in"] = dated(cfg["in"], date, "in")


def validate(cfg) -> None:
    """Check the values the types cannot; raises ConfigError naming the key. With `run_date`
    set it also dates `out` and `in` (resolve_run_date), so every job's paths follow it."""
    resolve_run_date(cfg)
    for group, conf_cls in GROUPS.items():     # `+group.key=...` appends past the schema
        if group in cfg:
            extra = sorted(set(cfg[group]) - set(field_names(conf_cls)))
            if extra:
                raise ConfigError(f"{group}.{extra[0]}", f"unknown key; known: {', '.join(field_names(conf_cls))}")
    if "model" in cfg:
        m = cfg.model
        _check("model.dtype", m.dtype in DTYPES, f"must be one of {', '.join(DTYPES)} (got {m.dtype!r})")
        _check("model.device", m.device == "cpu" or m.device.startswith("cuda"),
               f"must be cpu, cuda or cuda:N (got {m.device!r})")
        try:
            from libinfer.models.config import check_quantization
            check_quantization(m.get("quantization"), m.dtype, m.device)
        except ValueError as e:
            raise ConfigError("model.quantization", str(e).removeprefix("model.quantization ")) from None
        for k in ("tp_size", "max_batch_size", "max_batch_tokens"):
            _check(f"model.{k}", m[k] >= 1, f"must be >= 1 (got {m[k]})")
        _check("model.kv_cache_gb", m.kv_cache_gb > 0, f"must be > 0 (got {m.kv_cache_gb})")
    if "generation" in cfg:
        generation_params(cfg.generation)
    if "data" in cfg:
        d = cfg.data
        _check("data.format", d.format in FORMATS, f"must be one of {', '.join(FORMATS)} (got {d.format!r})")
        _check("data.clean.unicode_form", d.clean.unicode_form is None or d.clean.unicode_form in UNICODE_FORMS,
               f"must be one of {', '.join(UNICODE_FORMS)} or null (got {d.clean.unicode_form!r})")
        _check("data.cluster_by", d.cluster_by in CLUSTER_BY,
               f"must be one of {', '.join(CLUSTER_BY)} (got {d.cluster_by!r})")
        _check("data.max_chars", d.max_chars >= 1, f"must be >= 1 (got {d.max_chars})")
        _check("data.num_partitions", d.num_partitions >= 0, f"must be >= 0 (got {d.num_partitions})")
        _check("data.limit", d.limit >= 0, f"must be >= 0 (got {d.limit})")
        _check("data.single_process_sample", d.single_process_sample >= 1, f"must be >= 1 (got {d.single_process_sample})")
        if d.template is not None:
            _check("data.template", "{text}" in d.template, f"must contain {{text}} (got {d.template!r})")
        _check("data.batch_defaults", d.batch_defaults in BATCH_DEFAULTS,
               f"must be one of {', '.join(BATCH_DEFAULTS)} (got {d.batch_defaults!r})")
        if d.format == "openai_batch":     # a batch line's body is the whole request
            for k in ("template", "chat_template"):
                _check(f"data.{k}", not d[k], "does not apply to data.format=openai_batch (each line's body says "
                                              "its prompt; chat lines use the chat template)")
    if "spark" in cfg:
        s = cfg.spark
        _check("spark.master", bool(s.master), "must be set (local[*], spark://host:port, yarn, k8s://...)")
        _check("spark.task_cpus", s.task_cpus >= 1, f"must be >= 1 (got {s.task_cpus})")
        _check("spark.executor_cores", s.executor_cores >= s.task_cpus,
               f"must be >= spark.task_cpus ({s.executor_cores} < {s.task_cpus})")
        _check("spark.task_max_failures", s.task_max_failures >= 1, f"must be >= 1 (got {s.task_max_failures})")
    if "waves" in cfg:
        _check("waves", cfg.waves >= 1, f"must be >= 1 (got {cfg.waves})")
    if "chunk_rows" in cfg:
        _check("chunk_rows", cfg.chunk_rows >= 1, f"must be >= 1 (got {cfg.chunk_rows})")
    if "cost" in cfg:
        validate_cost(cfg.cost)


def validate_cost(c) -> None:
    _check("cost.kind", c.kind == "auto" or c.kind in c.rates,
           f"must be auto or one of cost.rates ({', '.join(c.rates)}) (got {c.kind!r})")
    _check("cost.usd_per_hour", c.usd_per_hour is None or c.usd_per_hour >= 0, f"must be >= 0 (got {c.usd_per_hour})")
    _check("cost.executors", c.executors is None or c.executors >= 1, f"must be >= 1 (got {c.executors})")
    for k, v in c.rates.items():
        _check(f"cost.rates.{k}", v >= 0, f"must be >= 0 (got {v})")


def field_names(conf_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(conf_cls)]
