"""jobs.playground's OpenAI routes, driven by the official `openai` client (unmodified:
only base_url and api_key) against the real server (`python -m jobs.playground`) on
127.0.0.1. The tiny random model for most checks (its answers are compared with
libinfer's own Generator on the same parameters); the bundled SmolLM2 for the chat
template. One server per model for the module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from libinfer import GenerationParams
from test_playground import ROOT, playground_server

KEY = "sk-test-0123456789"
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(job_env, tiny_model, tmp_path_factory):
    """Tiny model, the key from the environment (as vLLM's VLLM_API_KEY), no queue (max_queue=0):
    a request arriving while one runs is refused at once, which makes the 429 test deterministic."""
    log = tmp_path_factory.mktemp("openai_server") / "server.log"
    env = dict(job_env["env"], LIBINFER_API_KEY=KEY)
    with playground_server(env, "model=tiny_random", "max_queue=0", "max_n=4", "max_out_seq_length=1000",
                           log_path=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(tiny_model):
    """libinfer's Generator on the same weights, in this process: what the server must answer."""
    from jobs._model import build_generator
    gen = build_generator(tiny_model, warmup=False)
    yield gen
    gen.close()


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def greedy(n_tokens: int, **kw) -> GenerationParams:
    return GenerationParams(temperature=0.0, greedy=True, out_seq_length=n_tokens, **kw)


# ------------------------------------------------------------------ plain answers

def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny_random"] and models[0].object == "model" and models[0].owned_by
    assert client.models.retrieve("tiny_random").id == "tiny_random"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_completion_equals_libinfer(client, ref):
    r = client.completions.create(model="tiny_random", prompt=PROMPT, max_tokens=8, temperature=0)
    want = ref.generate([PROMPT], greedy(8))[0]
    (choice,) = r.choices
    assert r.object == "text_completion" and r.model == "tiny_random" and r.id.startswith("cmpl-")
    assert choice.text == want.outputs[0].text and choice.index == 0
    assert choice.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[want.outputs[0].finish_reason]
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids) == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_concatenates_to_the_answer(client):
    kw = dict(model="tiny_random", prompt=PROMPT, max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert len(chunks) > 3                                  # streamed token by token, not in one piece
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_chat_equals_libinfer_on_the_template(client, ref):
    r = client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=6, temperature=0)
    ids = chat_ids(ref.tokenizer, CHAT)
    want = ref.generate([ids], greedy(6))[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.outputs[0].text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want.outputs[0].token_ids)

    chunks = list(client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)


def test_n2_seeded_is_reproducible_and_equals_libinfer(client, ref):
    kw = dict(model="tiny_random", prompt=PROMPT, max_tokens=6, temperature=0.9, top_p=0.95, n=2, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    want = ref.generate([PROMPT], GenerationParams(temperature=0.9, top_p=0.95, out_seq_length=6, n=2, seed=11))[0]
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices] == [o.text for o in want.outputs]
    assert a.choices[0].text != a.choices[1].text            # two candidates, not one twice
    assert a.usage.completion_tokens == 12

    streamed = {0: "", 1: ""}                               # chat, streamed: same texts per index
    for c in client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=5, temperature=0.9,
                                            n=2, seed=11, stream=True):
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    whole = client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=5, temperature=0.9, n=2,
                                           seed=11)
    assert streamed == {c.index: c.message.content for c in whole.choices}


def test_several_prompts_are_indexed_prompt_major(client, ref):
    prompts = ["Q: best cheap coffee\nA:", PROMPT]
    r = client.completions.create(model="tiny_random", prompt=prompts, max_tokens=4, temperature=0.8, n=2, seed=5)
    want = ref.generate(prompts, GenerationParams(temperature=0.8, out_seq_length=4, n=2, seed=5))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [o.text for res in want for o in res.outputs]
    assert r.usage.prompt_tokens == sum(len(res.prompt_token_ids) for res in want)


def test_stop_is_cut_and_never_streamed(client):
    """A stop string taken from the middle of a seeded answer: the answer ends before it,
    in the whole answer and in the stream."""
    # The answer without the stop comes from the server itself: a sampled token of the random
    # model (a near-uniform distribution over 49k tokens) can flip when a float's last bit
    # differs, and the server's KV cache has another shape than `ref`'s after earlier tests.
    sampled = dict(temperature=1.0, seed=3)
    text = client.completions.create(model="tiny_random", prompt=PROMPT, max_tokens=20, **sampled).choices[0].text
    start = len(text) // 2
    stop = text[start:start + 4]
    assert len(stop) == 4 and stop.strip(), text
    kw = dict(model="tiny_random", prompt=PROMPT, max_tokens=20, stop=[stop, "\x00never"], **sampled)
    r = client.completions.create(**kw)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


# ----------------------------------------------------------------------- logprobs

def test_completion_logprobs_are_the_models(client, ref):
    r = client.completions.create(model="tiny_random", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == len(PROMPT) and lp.text_offset == sorted(lp.text_offset)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and top[tok] == chosen == max(top.values())       # greedy: the chosen is the best
    # Spot check against the model itself: log_softmax of its logits, teacher-forced.
    want = ref.generate([PROMPT], greedy(5))[0]
    assert lp.token_logprobs == pytest.approx(ref.score(want.prompt_token_ids, want.outputs[0].token_ids), abs=1e-3)


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=4, temperature=0.7, seed=1,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-6
    plain = client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


# --------------------------------------------------------------- structured output

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}


def test_response_format_json_schema(client):
    """Even the random model's answers parse and validate: the schema is a mask on its logits."""
    r = client.chat.completions.create(
        model="tiny_random", messages=CHAT, max_tokens=40, temperature=1.0, seed=2, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    for c in r.choices:
        value = json.loads(c.message.content)
        assert set(value) == {"color", "ok"} and value["color"] in ("red", "green", "blue")
        assert isinstance(value["ok"], bool) and c.finish_reason == "stop"


def test_guided_fields_in_extra_body(client):
    r = client.completions.create(model="tiny_random", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=4, n=2,
                                  extra_body={"guided_choice": ["Paris", "Lyon"]})
    assert {c.text for c in r.choices} <= {"Paris", "Lyon"}
    r = client.completions.create(model="tiny_random", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=4,
                                  extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    import re
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].text), r.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny_random", prompt=PROMPT, extra_body={"guided_regex": "(unclosed"})
    assert e.value.body["param"] == "guided_regex"


# -------------------------------------------------------------------------- errors

BAD = [  # (body fields, the param the 400 names)
    ({"temperature": 5}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 5000}, "max_tokens"),
    ({"n": 9}, "n"), ({"top_p": 0}, "top_p"), ({"stop": [""]}, "stop"), ({"seed": 1.5}, "seed"),
    ({"logprobs": 30}, "logprobs"), ({"logit_bias": {"50256": -100}}, "logit_bias"), ({"best_of": 3}, "best_of"),
    ({"echo": True}, "echo"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"suffix": "!"}, "suffix"),
    ({"frobnicate": 1}, "frobnicate"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1, "a"]}, "prompt"), ({"min_tokens": 99, "max_tokens": 4}, "min_tokens"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
def test_bad_value_is_400_naming_it(server, fields, param):
    r = httpx.post(server + "/v1/completions", json={"model": "tiny_random", "prompt": "hi", **fields},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]


def test_bad_parameter_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny_random", prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny_random", messages=CHAT, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny_random", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.body["param"] == "messages[0].content[0].type"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    long = "hello " * 2100                                  # > the tiny model's 2048-token context
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny_random", prompt=long, max_tokens=4, stream=stream)
        assert e.value.body["param"] == "prompt" and "prompt too long" in e.value.body["message"]


def test_missing_or_wrong_key_is_401(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.completions.create(model="tiny_random", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny_random", "messages": CHAT})   # no key
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/presets"):                          # the page's own API too
        assert httpx.get(server + path).status_code == 401
    for path in ("/", "/static/playground.js", "/healthz"):             # the page itself, to ask for the key
        assert httpx.get(server + path).status_code == 200
    assert httpx.get(server + "/healthz").json()["auth"] is True


def test_queue_full_is_429(server, client):
    """max_queue=0: while one request runs, the next is refused with OpenAI's 429."""
    answer = {}

    def slow():
        answer["r"] = client.completions.create(model="tiny_random", prompt="slow", max_tokens=300,
                                                extra_body={"ignore_eos": True})

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 60
    while not httpx.get(server + "/healthz").json()["running"]:
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tiny_random", messages=CHAT, max_tokens=2)
    assert httpx.get(server + "/healthz").json()["running"], "the slow request ended too early for this test"
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    assert "max_queue" in e.value.body["message"]
    t.join()
    assert answer["r"].usage.completion_tokens == 300


# ------------------------------------------------------------------- start-up checks

def test_open_network_host_needs_a_key(job_env):
    env = {k: v for k, v in job_env["env"].items() if k != "LIBINFER_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "jobs.playground", "host=0.0.0.0", "model=tiny_random"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "host" in r.stderr and "api_key" in r.stderr and "allow_unauthenticated" in r.stderr


@pytest.mark.parametrize("overrides,refused", [
    (["host=0.0.0.0"], True), (["host=192.168.1.5"], True), (["host=example.com"], True),
    (["host=0.0.0.0", "api_key=k"], False), (["host=0.0.0.0", "allow_unauthenticated=true"], False),
    (["host=127.0.0.1"], False), (["host=localhost"], False), (["host=::1"], False),
])
def test_host_and_key_rules(monkeypatch, overrides, refused):
    from hydra import compose, initialize_config_dir
    from jobs._config import ConfigError
    from jobs.playground import check_config
    monkeypatch.delenv("LIBINFER_API_KEY", raising=False)
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        cfg = compose("playground", overrides=overrides)
    if refused:
        with pytest.raises(ConfigError, match="host"):
            check_config(cfg)
    else:
        check_config(cfg)
    monkeypatch.setenv("LIBINFER_API_KEY", "from-env")
    check_config(cfg)


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2_server(job_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai_smollm2") / "server.log"
    env = {k: v for k, v in job_env["env"].items() if k != "LIBINFER_API_KEY"}
    with playground_server(env, "model=smollm2_135m", log_path=log) as url:
        yield url


def test_chat_on_smollm2_uses_its_template(smollm2_server):
    from libinfer import Checkpoint
    client = openai.OpenAI(base_url=smollm2_server + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    assert model == "smollm2_135m"
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    tok = Checkpoint.open(None).load_tokenizer()
    assert r.usage.prompt_tokens == len(chat_ids(tok, CHAT))   # the template's tokens, nothing added
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=12, temperature=0, stream=True))
    assert streamed == answer


def test_text_stream_never_sends_half_a_character(ref):
    """Korean syllables are three UTF-8 bytes, split over byte-level tokens: no delta holds
    U+FFFD, and the deltas add up to the text."""
    from jobs._openai import TextStream
    text = "검색어 추천: 커피 ☕ café"
    ids = ref.tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in ref.decode_text(ids[:i]) for i in range(1, len(ids)))   # the case exists
    ts = TextStream(ref.decode_text, GenerationParams(stop_sequences=["\n\n", "Q:"]))
    deltas = [ts.push(t) for t in ids[:-1]]
    deltas.append(ts.finish(ref.decode_text(ids)))
    assert not any("\ufffd" in d for d in deltas) and "".join(deltas) == text
    assert sum(bool(d) for d in deltas) > 5                 # sent as it came, not all at the end
