"""Structured output (libinfer/structured.py): every finished row parses and validates,
with greedy and sampling, n > 1, stop sequences, shared prefixes, per-row schemas and tp;
bad guides are refused naming the field; logprobs are the model's."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from libinfer import GenerationParams, Generator, ParamError, from_response_format, GuideError


def varied_schema(rng: random.Random) -> dict:
    """A bounded object schema (every output can finish inside the token limit)."""
    pool = {
        "name": {"type": "string", "maxLength": rng.choice([8, 16, 24])},
        "count": {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 999])},
        "ok": {"type": "boolean"},
        "color": {"enum": rng.sample(["red", "green", "blue", "amber", "teal"], 3)},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1,
                 "maxItems": rng.choice([2, 3])},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "where": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                  "required": ["city"], "additionalProperties": False},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 12}]},
    }
    keys = rng.sample(sorted(pool), rng.randint(1, 4))
    return {"type": "object", "properties": {k: pool[k] for k in keys}, "required": keys,
            "additionalProperties": False}


HEADER = ("You answer with one JSON object describing the item.\n"
          "Item: a red bicycle -> {\"name\": \"bicycle\", \"count\": 1}\n"
          "Item: three green apples -> {\"name\": \"apple\", \"count\": 3}\n")


def _all_validate(res, schemas):
    assert all(r.ok for r in res)
    for r, schema in zip(res, schemas):
        out = r.outputs[0]
        assert out.finish_reason != "length", out.text
        jsonschema.validate(json.loads(out.text), schema)        # 100%: any failure fails the test


ITEMS = ["a blue car", "two cats", "an old map of Paris", "five yellow pencils", "a teal kettle",
         "nine books on a shelf", "a lost umbrella", "an amber lamp"]


def test_hundreds_of_rows_with_varied_schemas_all_validate(random_models):
    """320 rows, each with its own schema, in one call: a random model draws whatever the
    mask leaves it, so this exercises the grammar far from the outputs a trained model
    would pick; every row must still finish and validate."""
    rng = random.Random(0)
    gen = Generator.from_pretrained(random_models["gqa_untied"], warmup=False)
    n_rows = 320
    prompts = [HEADER + f"Item: {ITEMS[i % len(ITEMS)]} #{i} ->" for i in range(n_rows)]
    schemas = [varied_schema(rng) for _ in range(n_rows)]
    res = gen.generate(prompts, GenerationParams(temperature=1.0, seed=3, out_seq_length=256),
                       guides=[{"guided_json": s} for s in schemas])
    _all_validate(res, schemas)
    assert res.metrics.prefix_hit_tokens > 0 and res.metrics.guide_s > 0


def test_real_model_rows_with_varied_schemas_validate(smollm2):
    rng = random.Random(1)
    prompts = [HEADER + f"Item: {ITEMS[i % len(ITEMS)]} ->" for i in range(24)]
    schemas = [varied_schema(rng) for _ in prompts]
    res = smollm2.generate(prompts, GenerationParams(greedy=True, out_seq_length=96, stop_sequences=("\n",)),
                           guides=[{"guided_json": s} for s in schemas])
    _all_validate(res, schemas)
    assert res.metrics.prefix_hit_tokens > 0                      # the shared header was reused


def test_sampling_n_candidates_regex_and_choice(smollm2):
    prompts = ["My phone number is", "Call the office at"]
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    p = GenerationParams(temperature=1.0, top_p=0.9, seed=7, n=3, out_seq_length=24, guided_regex=phone)
    res = smollm2.generate(prompts, p)
    texts = [o.text for r in res for o in r.outputs]
    assert len(texts) == 6 and all(re.fullmatch(phone, t) for t in texts), texts
    assert len(set(texts)) > 1                                    # sampling still samples
    assert [o.text for o in smollm2.generate(prompts, p)[0].outputs] == [o.text for o in res[0].outputs]

    choices = ("positive", "negative", "neutral")
    c = smollm2.generate(["Review: I loved it. Sentiment:", "Review: awful, broken. Sentiment:"],
                         GenerationParams(temperature=0.7, seed=1, n=4, out_seq_length=8, guided_choice=choices))
    assert all(o.text in choices and o.finish_reason == "stop" for r in c for o in r.outputs)


def test_permissive_guide_changes_nothing(smollm2):
    """A grammar that allows every text masks no token the model would pick: the greedy
    tokens equal the unguided ones (the mask is aligned with the vocabulary)."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    base = GenerationParams(greedy=True, out_seq_length=24)
    plain = smollm2.generate(prompts, base)
    guided = smollm2.generate(prompts, base.replace(guided_regex=r"(?s:.*)"))
    assert [o.token_ids for r in guided for o in r.outputs] == [o.token_ids for r in plain for o in r.outputs]


def test_min_tokens_gives_way_to_a_complete_grammar(smollm2):
    res = smollm2.generate(["Answer yes or no:"], GenerationParams(greedy=True, out_seq_length=8, min_tokens=6,
                                                                   guided_choice=("yes", "no")))
    assert res[0].outputs[0].text in ("yes", "no")


def test_bad_guides_are_refused_naming_the_field(smollm2):
    for kwargs, name in [({"guided_json": {"type": "frob"}}, "guided_json"), ({"guided_regex": "a(b"}, "guided_regex"),
                         ({"guided_choice": []}, "guided_choice"), ({"guided_json": "{nope"}, "guided_json"),
                         ({"guided_json": {"type": "object"}, "guided_regex": "x"}, "guided_regex")]:
        with pytest.raises(ParamError) as e:
            GenerationParams(**kwargs)
        assert e.value.field == name
    res = smollm2.generate(["a", "b"], GenerationParams(out_seq_length=4, greedy=True),
                           guides=[{"guided_json": {"type": "frob"}}, None])
    assert not res[0].ok and "guided_json" in res[0].error and res[1].ok


def test_response_format_maps_onto_guides():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == \
        {"guided_json": schema}
    assert from_response_format({"type": "json_object"}) == {"guided_json": {"type": "object"}}
    assert from_response_format({"type": "text"}) == {} == from_response_format(None)
    with pytest.raises(GuideError) as e:
        from_response_format({"type": "xml"})
    assert e.value.field == "response_format.type"


def test_logprobs_are_the_models(smollm2):
    prompt = "The capital of France is"
    res = smollm2.generate([prompt], GenerationParams(greedy=True, out_seq_length=4, logprobs=3))
    out = res[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 4
    ids = res[0].prompt_token_ids
    scored = smollm2.score(ids, out.token_ids)                 # teacher-forced log-probabilities
    for lp, want, tok in zip(out.logprobs, scored, out.token_ids):
        assert lp.token_id == tok and abs(lp.logprob - want) < 1e-3
        assert len(lp.top) == 3 and lp.top[0][0] == tok        # greedy: the chosen token is the top one
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_guided_under_tensor_parallelism(random_models):
    path = random_models["gqa_untied"]
    schema = {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 50}},
              "required": ["k"], "additionalProperties": False}
    p = GenerationParams(greedy=True, out_seq_length=16, guided_json=schema)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    one = Generator.from_pretrained(path, warmup=False).generate(prompts, p)
    with Generator.from_pretrained(path, tp_size=2, tp_timeout_s=60, warmup=False) as gen:
        two = gen.generate(prompts, p)
    assert [o.text for r in two for o in r.outputs] == [o.text for r in one for o in r.outputs]
    for r in two:
        jsonschema.validate(json.loads(r.outputs[0].text), schema)
