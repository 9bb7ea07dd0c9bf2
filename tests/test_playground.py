"""jobs.playground's REST API, against the real server (`python -m jobs.playground`) on
127.0.0.1, with the tiny random model (the output text does not matter here; the browser
test uses the real model)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from libinfer import PRESETS, GenerationParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = [f.name for f in dataclasses.fields(GenerationParams)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def playground_server(env: dict, *overrides: str, log_path, start_timeout_s: float = 180):
    """Start `python -m jobs.playground` on a free 127.0.0.1 port, in the log's folder (so a
    local MLflow store puts its artifacts there); yields its base URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.playground", "host=127.0.0.1", f"port={port}", *overrides],
                                cwd=os.path.dirname(log_path), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"playground exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"playground did not start in {start_timeout_s}s:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(job_env, tiny_model, tmp_path_factory):
    """The tiny model behind a queue of one waiting request (max_queue=1)."""
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with playground_server(job_env["env"], "model=tiny_random", "max_queue=1", "max_n=4", "max_prompts=4",
                           "max_prompt_chars=20000", "max_out_seq_length=1000", log_path=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def test_health_models_presets_openapi_and_page(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model"] == "tiny_random" and h["max_queue"] == 1
    m = client.get("/v1/models").json()["data"][0]
    assert m["id"] == "tiny_random" and m["max_model_len"] == 2048 and m["n_params"] > 0
    presets = client.get("/v1/presets").json()
    assert presets["test1"] == PRESETS["test1"].to_dict() and presets["test2"] == PRESETS["test2"].to_dict()
    assert presets["server"] == PRESETS["test1"].to_dict()      # conf/playground.yaml: generation: test1
    schema = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/models", "/healthz", "/v1/overrides"} <= set(schema["paths"])
    body = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert set(PARAMS) | {"prompt", "prompts", "preset"} == set(body)
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert client.get("/static/playground.js").status_code == 200


def test_generate_matches_libinfer(client, tiny_model):
    """Sampled, several prompts and candidates: the answer is what libinfer itself returns."""
    body = {"prompts": ["The capital of France is", "Q: best cheap coffee near me\nA:"], "temperature": 0.8,
            "top_k": 20, "top_p": 0.9, "seed": 3, "n": 2, "out_seq_length": 6, "stop_sequences": [], "greedy": False,
            "repetition_penalty": 1.2, "restart": "\nQ:"}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    params = PRESETS["test1"].replace(**{k: v for k, v in body.items() if k != "prompts"})
    assert data["params"] == params.to_dict()
    assert [x["prompt"] for x in data["results"]] == body["prompts"]
    n_gen = 0
    for res in data["results"]:
        assert len(res["candidates"]) == 2 and res["prompt_tokens"] > 0
        for c in res["candidates"]:
            assert c["finish_reason"] in ("stop", "eos", "length") and c["text"].endswith("\nQ:")
            assert c["generated_tokens"] == len(c["token_ids"]) <= 6
            n_gen += len(c["token_ids"])
    assert data["usage"]["generated_tokens"] == n_gen
    t = data["timings"]
    assert 0 < t["ttft_s"] <= t["generate_s"] <= t["latency_s"] and t["tokens_per_s"] > 0 and t["queue_s"] >= 0
    assert data["hydra_overrides"].startswith("generation.temperature=0.8 ")

    from jobs._model import build_generator
    gen = build_generator(tiny_model, warmup=False)
    ref = gen.generate(body["prompts"], params)
    assert [[c["token_ids"] for c in res["candidates"]] for res in data["results"]] == \
           [[o.token_ids for o in res.outputs] for res in ref]
    assert client.post("/v1/generate", json=body).json()["results"] == data["results"]     # seeded: reproducible


BAD = [  # (field, bad value): pydantic's type checks and GenerationParams' own validation
    ("temperature", -1), ("temperature", "hot"), ("out_seq_length", 0), ("out_seq_length", 1.5),
    ("out_seq_length", 5000), ("recompute", "yes"), ("greedy", 1), ("top_p", 0), ("top_p", 1.5), ("top_k", -1),
    ("top_k", 2.5), ("repetition_penalty", 0), ("stop_sequences", [""]), ("stop_sequences", "\n"),
    ("stop_sequences", [1]), ("start", 5), ("restart", None), ("ignore_eos", "no"), ("min_tokens", -1),
    ("min_tokens", 99), ("seed", "abc"), ("seed", 1.5), ("n", 0), ("n", 100), ("preset", "test3"), ("bogus", 1),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_field_is_422_naming_it(client, name, value):
    r = client.post("/v1/generate", json={"prompt": "hi", name: value})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"][:2] == ["body", name], detail
    assert client.post("/v1/overrides", json={name: value}).status_code == 422


@pytest.mark.parametrize("body,loc", [
    ({}, ["body", "prompt"]),
    ({"prompt": "a", "prompts": ["b"]}, ["body", "prompt"]),
    ({"prompts": []}, ["body", "prompts"]),
    ({"prompts": ["a"] * 5}, ["body", "prompts"]),
    ({"prompt": ""}, ["body", "prompt"]),
])
def test_bad_prompts_are_422(client, body, loc):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text


def test_over_long_prompt_is_a_clear_422(client):
    long = "hello " * 2100                  # > 2048 tokens: the tiny model's context
    r = client.post("/v1/generate", json={"prompts": ["short", long]})
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["loc"] == ["body", "prompts", 1] and "prompt too long" in d["msg"] and "2048" in d["msg"]
    r = client.post("/v1/generate", json={"prompt": "x" * 20001})      # refused before tokenizing
    assert r.status_code == 422 and "max_prompt_chars" in r.json()["detail"][0]["msg"]
    assert client.post("/v1/generate", json={"prompt": "still alive?", "out_seq_length": 2}).status_code == 200


def _wait_health(client, pred, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = client.get("/healthz").json()
        if pred(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"server never reached the state; last: {h}")


def test_queue_full_is_429_and_queued_requests_still_run(server, client):
    """max_queue=1: one slow request runs, one waits, the third is refused at once."""
    answers = {}

    def post(key, body):
        with httpx.Client(base_url=server, timeout=300) as c:
            answers[key] = c.post("/v1/generate", json=body)

    slow = {"prompt": "slow", "out_seq_length": 1000, "ignore_eos": True, "stop_sequences": []}
    a = threading.Thread(target=post, args=("slow", slow))
    a.start()
    _wait_health(client, lambda h: h["running"])
    b = threading.Thread(target=post, args=("queued", {"prompt": "queued", "out_seq_length": 3}))
    b.start()
    _wait_health(client, lambda h: h["waiting"] == 1)
    r = client.post("/v1/generate", json={"prompt": "one too many", "out_seq_length": 3})
    assert client.get("/healthz").json()["running"], "the slow request ended too early for this test"
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "max_queue" in r.json()["detail"]
    a.join()
    b.join()
    assert answers["slow"].status_code == 200 and answers["slow"].json()["usage"]["generated_tokens"] == 1000
    assert answers["queued"].status_code == 200 and answers["queued"].json()["timings"]["queue_s"] > 0
    _wait_health(client, lambda h: not h["running"] and h["waiting"] == 0)


def test_concurrent_users_are_all_answered(server, client):
    """Eight users at once on a queue of one: each is served or told 429, retries, and
    gets exactly what it would get alone."""
    prompts = [f"user {i} asks about {w}" for i, w in enumerate("coffee tea shoes bread camera maps news music".split())]
    body = {"out_seq_length": 8, "greedy": True, "stop_sequences": []}
    alone = [client.post("/v1/generate", json={"prompt": p, **body}).json()["results"][0] for p in prompts]
    got = {}

    def user(i):
        with httpx.Client(base_url=server, timeout=120) as c:
            while True:
                r = c.post("/v1/generate", json={"prompt": prompts[i], **body})
                if r.status_code != 429:
                    got[i] = r
                    return
                time.sleep(0.05)   # Retry-After says 1 s; a test need not wait that long

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(len(prompts)))
    assert all(r.status_code == 200 for r in got.values()), [r.text for r in got.values() if r.status_code != 200]
    assert [got[i].json()["results"][0] for i in range(len(prompts))] == alone
    assert client.get("/healthz").json()["status"] == "ok"


# ------------------------------------------------------------------ Hydra override line

NASTY = ["\n", "\nA:", 'say "hi"', "it's", "back\\", 'a\\"b', "${oc.env:HOME}", "\\${x}", "[x], {y}", "tab\tx",
         "한국어 ü", "$HOME `ls` *", " lead", "\r\n\x01"]


def shell_words(line: str) -> list[str]:
    """The arguments bash passes for `python -m jobs.pipeline <line>`."""
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                         capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def pipeline_generation(line: str) -> GenerationParams:
    """jobs.pipeline's composed `generation` config for that command line."""
    from conftest import job_cfg
    from jobs._config import generation_params
    return generation_params(job_cfg(*shell_words(line)).generation)


def test_hydra_overrides_reach_jobs_pipeline_unchanged():
    from jobs.playground import hydra_overrides
    params = PRESETS["test2"].replace(stop_sequences=NASTY, start=NASTY[1], restart="".join(NASTY), seed=7,
                                      temperature=0.7, top_p=1e-05, n=3, greedy=False, recompute=True)
    assert pipeline_generation(hydra_overrides(params)) == params
    assert pipeline_generation(hydra_overrides(PRESETS["test1"])) == PRESETS["test1"]
    assert hydra_overrides(PRESETS["test1"]).startswith(
        "generation.temperature=0.0 generation.out_seq_length=16 generation.recompute=false generation.greedy=true "
        "generation.top_p=0.8 generation.top_k=0 generation.repetition_penalty=5.0 $'generation.stop_sequences=[\"\\n\"]'")


def test_overrides_endpoint(client):
    r = client.post("/v1/overrides", json={"preset": "test2", "start": "\nA:", "seed": 5})
    assert r.status_code == 200, r.text
    want = PRESETS["test2"].replace(start="\nA:", seed=5)
    assert r.json()["params"] == want.to_dict()
    assert pipeline_generation(r.json()["hydra_overrides"]) == want


def test_config_typo_fails_at_start(job_env):
    r = subprocess.run([sys.executable, "-m", "jobs.playground", "prot=8000"], cwd=ROOT, env=job_env["env"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "prot" in r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.playground", "max_queue=-1", "model=tiny_random"], cwd=ROOT,
                       env=job_env["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max_queue" in r.stderr
