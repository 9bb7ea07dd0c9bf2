"""Bad input never crashes a job nor loses a row: every input row ends in results/ or in
quarantine/ with its reason. A wrong path or config value: one clear line, non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import JOB_ROOT, assert_exactly_once, read_out, write_jsonl

NASTY = [
    {"id": "ok1", "prompt": "a normal prompt about coffee"},
    {"id": "null", "prompt": None},
    {"id": "empty", "prompt": ""},
    {"id": "blank", "prompt": " \t \n  "},
    b'{"id": "utf8", "prompt": "bad \xff\xfe bytes"}',
    {"id": "ctrl", "prompt": "control\x00\x07 chars\x1b are \x7f stripped"},
    {"id": "huge", "prompt": "x" * 100_001},
    {"id": "long", "prompt": "word " * 3000},              # under max_chars, over the 2048-token context
    {"id": "dup", "prompt": "first copy"},
    {"id": "dup", "prompt": "second copy"},
    {"prompt": "no id field"},
    {"id": None, "prompt": "null id"},
    b'{"id": "broken", "prompt": ',
    b'["not", "an", "object"]',
    {"id": 42, "prompt": "an integer id"},
    {"id": "num", "prompt": 3.5},
    {"id": "ok2", "prompt": "another fine prompt\r\nwith\ta line break"},
]


def test_nasty_corpus_every_row_once(spark, run_cfg, tmp_path):
    from jobs._spark import Output, prepare_output
    from jobs.generate import run_generate
    from jobs.preprocess import run_preprocess
    path = write_jsonl(tmp_path / "nasty.jsonl", NASTY)
    cfg = run_cfg(f"data.path={path}", "generation.out_seq_length=4")
    out = Output(spark, cfg.out)
    prepare_output(out, ["clustered", "quarantine", "results"], resume=False, overwrite=False)
    pre = run_preprocess(spark, cfg, out)
    assert (pre["rows_in"], pre["rows_out"]) == (len(NASTY), 4)
    run_generate(spark, cfg, cfg.out, out, resume=False)

    res, q = read_out(cfg.out)
    assert len(res) + len(q) == len(NASTY)                  # every row, exactly once
    assert sorted(res["id"]) == ["42", "ctrl", "ok1", "ok2"]
    ids = [r["id"] if isinstance(r, dict) and isinstance(r.get("id"), (str, int)) else None for r in NASTY]
    assert_exactly_once(cfg.out, ids)
    reason = dict(zip(q["id"].fillna("<none>"), q["reason"]))
    assert reason["null"] == "null text (no 'prompt' value)"
    assert reason["empty"].startswith("empty text") and reason["blank"].startswith("empty text")
    assert any(r.startswith("invalid UTF-8") for r in q["reason"])
    assert reason["huge"].startswith("text too long: 100001 characters")
    assert reason["long"].startswith("prompt too long")
    assert reason["num"] == "text is not a string: float"
    assert list(q.loc[q["id"] == "dup", "reason"]) == ["duplicate id: 2 rows have it"] * 2
    assert sum(r.startswith("missing id") for r in q["reason"]) == 2
    assert any(r.startswith("invalid JSON") for r in q["reason"])
    assert any(r.startswith("not a JSON object") for r in q["reason"])
    assert all(isinstance(r, str) and r for r in q["raw"]), q[["id", "reason", "raw"]]   # kept to fix it
    prompts = dict(zip(res["id"], res["prompt"]))
    assert prompts["ctrl"] == "control chars are stripped"
    assert prompts["ok2"] == "another fine prompt\nwith a line break"


def test_missing_id_column_in_parquet_is_a_clear_error(spark, run_cfg, tmp_path):
    from jobs._spark import JobError, Output
    from jobs.preprocess import run_preprocess
    pd.DataFrame({"prompt": ["a", "b"]}).to_parquet(tmp_path / "noid.parquet")
    cfg = run_cfg(f"data.path={tmp_path / 'noid.parquet'}", "data.format=parquet")
    with pytest.raises(JobError, match="column 'id' not found"):
        run_preprocess(spark, cfg, Output(spark, cfg.out))


def run_job(args, env, module="jobs.pipeline"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=JOB_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["data.path=/no/such/file.jsonl"], "error: data.path: /no/such/file.jsonl does not exist"),
    (["generation.top_p=2"], "error: config 'generation.top_p': must be in (0, 1]"),
    (["model.dtype=float64"], "error: config 'model.dtype': must be one of"),
    (["spark.task_cpus=0"], "error: config 'spark.task_cpus': must be >= 1"),
])
def test_bad_path_or_value_one_line_error(job_env, args, message, tmp_path):
    p = run_job([*args, f"out={tmp_path / 'o'}", "mlflow.enabled=false"], job_env["env"])
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(message), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args, name", [(["generation.top_pp=0.9"], "generation.top_pp"),
                                        (["model.max_batch_size=lots"], "model.max_batch_size"),
                                        (["in=/no/such/dir"], "does not exist")])
def test_misspelled_key_or_wrong_type_fails_at_start(job_env, args, name, tmp_path):
    p = run_job([*args, f"out={tmp_path / 'o'}", "mlflow.enabled=false"], job_env["env"], module="jobs.generate")
    assert p.returncode != 0 and name in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_generation_group_is_exactly_generation_params():
    import dataclasses
    from jobs._config import GenerationConf, field_names
    from libinfer import GenerationParams
    assert field_names(GenerationConf) == [f.name for f in dataclasses.fields(GenerationParams)]


@pytest.mark.parametrize("preset", ["default", "test1", "test2"])
def test_generation_presets_match_libinfer(preset):
    from conftest import job_cfg
    from jobs._config import generation_params
    from libinfer import PRESETS
    assert generation_params(job_cfg(f"generation={preset}").generation) == PRESETS[preset]


def test_generation_guides_from_the_command_line(tmp_path):
    """generation.guided_json= takes a schema (YAML mapping or JSON text) or a .json path."""
    import json
    from conftest import job_cfg
    from jobs._config import ConfigError, generation_params
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    want = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    for value in (str(path), "'" + json.dumps(schema) + "'", "{type: object, properties: {q: {type: string}}, "
                                                             "required: [q]}"):
        assert generation_params(job_cfg(f"generation.guided_json={value}").generation).guided_json == want
    assert generation_params(job_cfg("generation.guided_choice=[yes,no]").generation).guided_choice == ("yes", "no")
    with pytest.raises(ConfigError, match="generation.guided_json"):
        generation_params(job_cfg(f"generation.guided_json={tmp_path / 'missing.json'}").generation)
    with pytest.raises(ConfigError, match="generation.guided_regex"):
        generation_params(job_cfg("generation.guided_regex='a(b'").generation)


@pytest.mark.parametrize("override, key", [("+model.colour=red", "model.colour"),
                                           ("data.format=csv", "data.format"),
                                           ("generation.n=0", "generation.n"),
                                           ("waves=0", "waves")])
def test_bad_config_names_the_key(override, key):
    from conftest import job_cfg
    from jobs._config import ConfigError
    with pytest.raises(ConfigError, match=f"config '{key}'"):
        job_cfg(override)
