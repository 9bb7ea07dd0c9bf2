"""OpenAI Batch API files through jobs.pipeline (data.format=openai_batch): completions and
chat lines with their own parameters, structured output, malformed lines, and the two
output files (every line in exactly one, once, also after a resumed run). One pipeline run
on the tiny random model is shared by most checks; a small chat round-trip runs on SmolLM2."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest

from conftest import JOB_ROOT, assert_exactly_once, job_cfg, write_jsonl

C, CH = "/v1/completions", "/v1/chat/completions"
SCHEMA_A = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]},
                                             "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["city", "rank"], "additionalProperties": False}
SCHEMA_B = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
SEED = 5      # generation.seed of the run: the seed of sampled lines that give none


def line(cid, url, body, method="POST"):
    return {"custom_id": cid, "method": method, "url": url, "body": {"model": "any-model", **body}}


def user(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def schema_format(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


GOOD = [
    line("c-greedy", C, {"prompt": "The best coffee in town is", "max_tokens": 8, "temperature": 0}),
    line("c-stop", C, {"prompt": "Q: cheap shoes\nA:", "max_tokens": 12, "temperature": 0, "stop": ["\n", "."]}),
    line("c-sampled", C, {"prompt": "Three ideas for dinner:", "max_tokens": 6, "temperature": 0.9, "seed": 11,
                          "n": 3}),
    line("c-defaults", C, {"prompt": "Once upon a time"}),     # OpenAI's defaults: temperature 1, 16 tokens
    line("c-ids", C, {"prompt": [510, 1205, 314, 2900], "max_tokens": 5, "temperature": 0}),
    line("c-logprobs", C, {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    line("c-regex", C, {"prompt": "Code:", "max_tokens": 12, "temperature": 0, "guided_regex": "[0-9]{3}-[A-Z]{2}"}),
    line("ch-greedy", CH, {"messages": user("Name a tea.", system="Be brief."), "max_tokens": 10, "temperature": 0}),
    line("ch-sampled", CH, {"messages": user("Say hi."), "max_tokens": 5, "temperature": 0.7, "seed": 3, "n": 2}),
    # Three rows of one parameter set with three different guides: one generate call.
    line("ch-json-a", CH, {"messages": user("A city as JSON."), "max_tokens": 40, "temperature": 0,
                           "response_format": schema_format("a", SCHEMA_A)}),
    line("ch-json-b", CH, {"messages": user("Is it ok? JSON."), "max_tokens": 40, "temperature": 0,
                           "response_format": schema_format("b", SCHEMA_B)}),
    line("ch-choice", CH, {"messages": user("Tea or coffee?"), "max_tokens": 40, "temperature": 0,
                           "guided_choice": ["tea", "coffee", "both"]}),
]
# (line, custom_id in the error file, the field its error names, HTTP status of its response or None)
BAD = [
    (b'{"custom_id": "broken", "method": "POST", ', None, None, None),
    ({"method": "POST", "url": C, "body": {"prompt": "no id"}}, None, "custom_id", None),
    (line("c-greedy", C, {"prompt": "a second line with this custom_id", "max_tokens": 3}), "c-greedy", "custom_id",
     None),
    (line("bad-url", "/v1/embeddings", {"input": "x"}), "bad-url", "url", None),
    (line("bad-method", C, {"prompt": "x"}, method="GET"), "bad-method", "method", None),
    (line("bad-logit-bias", C, {"prompt": "x", "logit_bias": {"12": 5}}), "bad-logit-bias", "logit_bias", 400),
    (line("bad-stream", C, {"prompt": "x", "stream": True}), "bad-stream", "stream", 400),
    (line("bad-temperature", C, {"prompt": "x", "temperature": -1}), "bad-temperature", "temperature", 400),
    (line("bad-schema", CH, {"messages": user("x"), "response_format": schema_format("x", {"type": "nonsense"})}),
     "bad-schema", "response_format", 400),
    (line("bad-field", C, {"prompt": "x", "frobnicate": 1}), "bad-field", "frobnicate", 400),
    (line("bad-prompts", C, {"prompt": ["one", "two"]}), "bad-prompts", "prompt", 400),
    # Fits the context alone, not with its max_tokens: refused by the generator (generate stage).
    (line("too-long", C, {"prompt": "word " * 2000, "max_tokens": 100}), "too-long", "prompt", 400),
]
LINES = GOOD[:4] + [BAD[0][0]] + GOOD[4:8] + [b[0] for b in BAD[1:6]] + GOOD[8:] + [b[0] for b in BAD[6:]]


def custom_id_of(rec):
    return rec.get("custom_id") if isinstance(rec, dict) else None


def run_pipeline(job_env, batch, out, *args):
    p = subprocess.run([sys.executable, "-m", "jobs.pipeline", f"data.path={batch}", "data.format=openai_batch",
                        f"out={out}", "spark=local2", "mlflow.enabled=false", *args],
                       cwd=JOB_ROOT, env=job_env["env"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def batch_run(job_env, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai_batch")
    batch = write_jsonl(root / "batch.jsonl", LINES)
    out = root / "out"
    p = run_pipeline(job_env, batch, out, "model=tiny_random", f"generation.seed={SEED}", "data.num_partitions=3")
    return {"out": out, "stdout": p.stdout, "batch": batch, "output": read_jsonl(out / "openai" / "output.jsonl"),
            "errors": read_jsonl(out / "openai" / "errors.jsonl")}


@pytest.fixture(scope="module")
def tiny_gen(tiny_model):
    from jobs._model import build_generator
    gen = build_generator(tiny_model, warmup=False)
    yield gen
    gen.close()


def bodies(run):
    return {o["custom_id"]: o["response"]["body"] for o in run["output"]}


def test_every_line_once_in_output_or_errors(batch_run):
    got = Counter([o["custom_id"] for o in batch_run["output"]] + [e["custom_id"] for e in batch_run["errors"]])
    assert got == Counter(custom_id_of(r) for r in LINES)
    assert {o["custom_id"] for o in batch_run["output"]} == {custom_id_of(r) for r in GOOD}
    # In input order; results/ and quarantine/ hold the same rows, exactly once.
    assert [o["custom_id"] for o in batch_run["output"]] == [custom_id_of(r) for r in LINES
                                                              if any(r is g for g in GOOD)]
    assert_exactly_once(batch_run["out"], [custom_id_of(r) for r in LINES])
    assert "openai:" in batch_run["stdout"] and f"({len(GOOD)} lines)" in batch_run["stdout"]


def test_output_lines_have_the_batch_api_shape(batch_run):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion
    ids = set()
    for o in batch_run["output"]:
        assert set(o) == {"id", "custom_id", "response", "error"} and o["error"] is None
        assert o["id"].startswith("batch_req_") and o["response"]["request_id"].startswith("req_")
        assert o["response"]["status_code"] == 200
        body = o["response"]["body"]
        kind = ChatCompletion if o["custom_id"].startswith("ch-") else Completion
        kind.model_validate(body)                  # the official client reads it
        assert body["model"] == "tiny_random"      # who answered, whatever the line asked for
        ids.add(o["id"])
    assert len(ids) == len(batch_run["output"])


def test_errors_name_the_field(batch_run):
    errors = {}
    for e in batch_run["errors"]:
        errors.setdefault(e["custom_id"], []).append(e)
    for rec, cid, param, status in BAD:
        e = errors[cid].pop(0) if cid is not None else next(x for x in errors[None] if
                                                            (param or "invalid JSON") in x["error"]["message"])
        assert set(e) == {"id", "custom_id", "response", "error"}
        if param:
            assert param in e["error"]["message"], (cid, e)
        if status is None:
            assert e["response"] is None, (cid, e)
        else:
            assert e["response"]["status_code"] == status
            assert e["response"]["body"]["error"]["param"] == param, (cid, e)
            assert e["response"]["body"]["error"]["message"] == e["error"]["message"]
    dup = next(e for e in batch_run["errors"] if e["custom_id"] == "c-greedy")
    assert "duplicate" in dup["error"]["message"]
    assert dup["error"]["code"] == "duplicate_custom_id"
    too_long = next(e for e in batch_run["errors"] if e["custom_id"] == "too-long")
    assert too_long["response"]["body"]["error"]["code"] == "context_length_exceeded"
    q = pd.read_parquet(batch_run["out"] / "quarantine").set_index("id")
    assert q.loc["too-long", "stage"] == "generate"
    assert q.loc["bad-logit-bias", "stage"] == "preprocess" and "logit_bias" in q.loc["bad-logit-bias", "raw"]


def direct(gen, prompt, **params):
    from libinfer import GenerationParams
    return gen.generate([prompt], GenerationParams(**params))[0]


def chat_ids(gen, messages):
    text = gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, list(gen.tokenizer(text, add_special_tokens=False).input_ids)


def texts(body):
    return [c["text"] if "text" in c else c["message"]["content"] for c in body["choices"]]


def check_usage(body, want):
    p, c = len(want.prompt_token_ids), sum(len(o.token_ids) for o in want.outputs)
    assert body["usage"] == {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def test_rows_equal_the_generator_with_the_lines_params(batch_run, tiny_gen):
    b = bodies(batch_run)
    reasons = {"eos": "stop", "stop": "stop", "length": "length"}
    # Greedy rows: the line's params on top of OpenAI's (not the job's test1 preset).
    for cid, prompt, params in [
        ("c-greedy", "The best coffee in town is", dict(out_seq_length=8)),
        ("c-stop", "Q: cheap shoes\nA:", dict(out_seq_length=12, stop_sequences=["\n", "."])),
        ("c-ids", [510, 1205, 314, 2900], dict(out_seq_length=5)),
    ]:
        want = direct(tiny_gen, prompt, temperature=0.0, greedy=True, **params)
        assert texts(b[cid]) == [o.text for o in want.outputs], cid
        assert [c["finish_reason"] for c in b[cid]["choices"]] == [reasons[o.finish_reason] for o in want.outputs]
        check_usage(b[cid], want)
    # Sampled rows: n candidates, the line's seed (or the job's), reproducible.
    for cid, prompt, params in [
        ("c-sampled", "Three ideas for dinner:", dict(temperature=0.9, seed=11, n=3, out_seq_length=6)),
        ("c-defaults", "Once upon a time", dict(temperature=1.0, seed=SEED, out_seq_length=16)),
    ]:
        want = direct(tiny_gen, prompt, **params)
        assert [c["index"] for c in b[cid]["choices"]] == list(range(params.get("n", 1)))
        assert texts(b[cid]) == [o.text for o in want.outputs], cid
        check_usage(b[cid], want)
    assert len(set(texts(b["c-sampled"]))) > 1


def test_chat_rows_use_the_chat_template(batch_run, tiny_gen):
    b = bodies(batch_run)
    res = pd.read_parquet(batch_run["out"] / "results").set_index("id")
    messages = user("Name a tea.", system="Be brief.")
    text, ids = chat_ids(tiny_gen, messages)
    assert res.loc["ch-greedy", "prompt"] == text and text.startswith("<|im_start|>system\nBe brief.")
    want = direct(tiny_gen, ids, temperature=0.0, greedy=True, out_seq_length=10)
    assert texts(b["ch-greedy"]) == [o.text for o in want.outputs]
    check_usage(b["ch-greedy"], want)
    assert b["ch-greedy"]["choices"][0]["message"]["role"] == "assistant"
    text, ids = chat_ids(tiny_gen, user("Say hi."))
    want = direct(tiny_gen, ids, temperature=0.7, seed=3, n=2, out_seq_length=5)
    assert texts(b["ch-sampled"]) == [o.text for o in want.outputs]


def valid(obj, schema) -> bool:
    """The few JSON-schema rules SCHEMA_A and SCHEMA_B use."""
    props = schema["properties"]
    if not isinstance(obj, dict) or set(obj) - set(props) or set(schema["required"]) - set(obj):
        return False
    for k, v in obj.items():
        p = props[k]
        ok = {"string": isinstance(v, str), "boolean": isinstance(v, bool),
              "integer": isinstance(v, int) and not isinstance(v, bool)}[p["type"]]
        ok = ok and ("enum" not in p or v in p["enum"]) and p.get("minimum", v) <= v <= p.get("maximum", v)
        if not ok:
            return False
    return True


def test_structured_output_from_batch_lines(batch_run):
    b = bodies(batch_run)
    for cid, schema in (("ch-json-a", SCHEMA_A), ("ch-json-b", SCHEMA_B)):
        (text,) = texts(b[cid])
        assert valid(json.loads(text), schema), (cid, text)
        assert b[cid]["choices"][0]["finish_reason"] == "stop"
    assert texts(b["ch-choice"])[0] in ("tea", "coffee", "both")
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", texts(b["c-regex"])[0])
    lp = b["c-logprobs"]["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == b["c-logprobs"]["usage"]["completion_tokens"]
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"])


def test_rows_grouped_by_parameter_set():
    from jobs._batchfile import param_groups
    a = json.dumps({"n": 1}), json.dumps({"n": 2})
    guides = [json.dumps({"guided_choice": ["x"]}), None, float("nan")]     # pandas gives NaN for null
    groups = param_groups([a[0], a[1], a[0]], guides)
    assert [(g[0].n, g[1], g[2]) for g in groups] == [(1, [0, 2], [{"guided_choice": ["x"]}, None]), (2, [1], [None])]


def test_resume_rewrites_the_files_exactly_once(batch_run, spark, tmp_path):
    """A run that lost one committed results file (crashed before its last wave), resumed:
    the missing rows are generated again and both files come out as before."""
    from jobs._spark import Output, prepare_output
    from jobs.generate import run_generate
    out = tmp_path / "resumed"
    shutil.copytree(batch_run["out"], out)
    files = sorted(f for f in os.listdir(out / "results") if f.endswith(".parquet"))
    lost = pd.read_parquet(out / "results" / files[0])
    assert len(lost) > 0
    os.remove(out / "results" / files[0])
    for d in ("results", "quarantine"):
        os.remove(out / d / "_SUCCESS")
    shutil.rmtree(out / "openai")
    cfg = job_cfg("model=tiny_random", "spark=local2", "mlflow.enabled=false", f"generation.seed={SEED}",
                  f"data.path={batch_run['batch']}", "data.format=openai_batch", f"out={out}", "resume=true")
    o = Output(spark, str(out))
    prepare_output(o, ["results", "quarantine"], resume=True, overwrite=False)
    m = run_generate(spark, cfg, str(out), o, resume=True)
    assert m["rows"] == len(lost)

    def strip(lines):      # `created` is the time of generation
        for x in lines:
            if x["response"] and "created" in x["response"]["body"]:
                del x["response"]["body"]["created"]
        return lines
    assert strip(read_jsonl(out / "openai" / "output.jsonl")) == strip(batch_run["output"])
    assert read_jsonl(out / "openai" / "errors.jsonl") == batch_run["errors"]
    assert_exactly_once(out, [custom_id_of(r) for r in LINES])


def test_line_defaults_openai_or_the_generation_group():
    from transformers import AutoTokenizer
    from jobs._batchfile import read_line
    from jobs._config import generation_params
    tok = AutoTokenizer.from_pretrained(job_cfg("model=tiny_random").model.path)
    body = json.dumps(line("x", C, {"prompt": "hi", "temperature": 0.5}))
    openai = json.loads(read_line(body, tok, None, 9).params)
    assert (openai["out_seq_length"], openai["repetition_penalty"], openai["stop_sequences"]) == (16, 1.0, [])
    assert (openai["temperature"], openai["greedy"], openai["seed"]) == (0.5, False, 9)
    test2 = generation_params(job_cfg("generation=test2").generation).to_dict()
    job = json.loads(read_line(body, tok, test2, 9).params)
    assert (job["out_seq_length"], job["repetition_penalty"], job["stop_sequences"]) == (50, 3.0, ["\n"])
    assert (job["temperature"], job["greedy"]) == (0.5, False)          # the line's temperature wins
    greedy = json.loads(read_line(json.dumps(line("y", C, {"prompt": "hi", "temperature": 0, "seed": 4})),
                                  tok, None, 9).params)
    assert greedy["seed"] is None        # no effect on argmax: greedy lines share one parameter set


def test_config_refuses_template_with_batch_files():
    from jobs._config import ConfigError
    with pytest.raises(ConfigError, match="data.chat_template"):
        job_cfg("data.format=openai_batch", "data.chat_template=true")
    with pytest.raises(ConfigError, match="data.batch_defaults"):
        job_cfg("data.batch_defaults=vllm")


@pytest.mark.slow
def test_chat_round_trip_on_smollm2(job_env, tmp_path, smollm2):
    qs = ["What is the capital of France?", "Name a primary colour."]
    lines = [line(f"q{i}", CH, {"messages": user(q), "max_tokens": 12, "temperature": 0}) for i, q in enumerate(qs)]
    lines.append(line("q-json", CH, {"messages": user("Give a French city and its rank as JSON."), "max_tokens": 30,
                                     "temperature": 0, "response_format": schema_format("city", SCHEMA_A)}))
    batch = write_jsonl(tmp_path / "chat.jsonl", lines)
    run_pipeline(job_env, batch, tmp_path / "out", "model=smollm2_135m")
    b = {o["custom_id"]: o["response"]["body"] for o in read_jsonl(tmp_path / "out" / "openai" / "output.jsonl")}
    assert set(b) == {"q0", "q1", "q-json"} and not read_jsonl(tmp_path / "out" / "openai" / "errors.jsonl")
    for i, q in enumerate(qs):
        text, ids = chat_ids(smollm2, user(q))
        assert text.startswith("<|im_start|>system\n") and f"<|im_start|>user\n{q}<|im_end|>" in text
        want = direct(smollm2, ids, temperature=0.0, greedy=True, out_seq_length=12)
        assert texts(b[f"q{i}"]) == [o.text for o in want.outputs]
        check_usage(b[f"q{i}"], want)
    assert "Paris" in texts(b["q0"])[0]                 # a real model answers
    assert valid(json.loads(texts(b["q-json"])[0]), SCHEMA_A)
