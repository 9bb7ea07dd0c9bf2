"""jobs.playground: try prompts with every generation parameter before a batch job, and
serve the same generator to OpenAI clients.

    python -m jobs.playground model=smollm2_135m host=127.0.0.1 port=8000

The talk's playground (3.2): a REST API and a web page on one libinfer Generator (the
same Generator and GenerationParams as jobs.generate; no second code path). Planners tune
a parameter set on the page, compare runs in its table, then copy the set as a Hydra
override line for jobs.pipeline.

    POST /v1/generate    prompt(s) + any GenerationParams field -> candidates, token counts, timings
    POST /v1/overrides   a parameter set -> the `generation.*=...` override line for jobs.pipeline
    GET  /v1/presets  /healthz  /docs (OpenAPI)  /  (the web page, jobs/static/)

OpenAI's API on the same queue (formats in jobs/_openai.py), so an unmodified `openai`
client with base_url=http://H:P/v1 works:

    POST /v1/completions  POST /v1/chat/completions   stream=true: server-sent events
    GET  /v1/models  /v1/models/{id}                 OpenAI's list shape (+ our model facts)

Errors on the OpenAI routes are OpenAI's `{"error": {message, type, param, code}}`: 400
naming the parameter, 401 without the key, 404 for another model's name, 429 when the
queue is full. With `api_key` (or LIBINFER_API_KEY) every /v1/* route needs
`Authorization: Bearer KEY` (the page asks for it); the page, its files, /healthz and
/docs stay open. A host other than loopback is refused without a key unless
`allow_unauthenticated=true`.

The generator is not thread-safe and holds one KV cache, so requests go through a bounded
queue to a single worker thread: concurrent users wait their turn, and past `max_queue`
waiting requests they get HTTP 429 instead of piling up memory. Streaming uses the
generator's on_token callback: tokens cross from the worker thread to the event loop as
they are drawn. A client that goes away mid-stream does not stop its generation (the
generator has no cancel); it finishes in the worker and is dropped.
"""
from __future__ import annotations

if not __package__:  # run as a file: import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import hydra
from fastapi import Request           # a route's annotation: FastAPI resolves it in this module
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, create_model

from jobs import _openai
from jobs._config import ConfigError, GenerationConf, MlflowConf, ModelConf, generation_params, validate
from jobs._openai import OpenAIError
from libinfer import PRESETS, GenerationParams, ParamError

log = logging.getLogger("jobs.playground")
STATIC = Path(__file__).parent / "static"


# ----------------------------------------------------------------------- config

@dataclass
class PlaygroundConf:
    """conf/playground.yaml (the `playground_schema` node)."""
    model: ModelConf = field(default_factory=ModelConf)
    generation: GenerationConf = field(default_factory=GenerationConf)   # what a request leaves out
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 8                 # requests waiting behind the running one; more -> HTTP 429
    max_prompts: int = 16              # prompts per request
    max_n: int = 8                     # candidates per prompt (each holds a KV-cache slot)
    max_out_seq_length: int = 1024     # keeps one request from holding the generator for minutes
    max_prompt_chars: int = 100_000    # rejected before tokenizing; the token limit is the model context
    threads: int = 0                   # torch threads; 0 = torch's default
    api_key: Optional[str] = None      # /v1/* need `Authorization: Bearer KEY`; null: $LIBINFER_API_KEY, else none
    allow_unauthenticated: bool = False   # serve a non-loopback host without a key anyway


ConfigStore.instance().store(name="playground_schema", node=PlaygroundConf)


def check_config(cfg) -> None:
    validate(cfg)
    if not 0 <= cfg.port <= 65535:
        raise ConfigError("port", f"must be in [0, 65535] (got {cfg.port})")
    if cfg.max_queue < 0:
        raise ConfigError("max_queue", f"must be >= 0 (got {cfg.max_queue})")
    for key in ("max_prompts", "max_n", "max_out_seq_length", "max_prompt_chars"):
        if cfg[key] < 1:
            raise ConfigError(key, f"must be >= 1 (got {cfg[key]})")
    if not api_key(cfg) and not is_loopback(cfg.host) and not cfg.allow_unauthenticated:
        raise ConfigError("host", f"{cfg.host} is reachable from other machines and no api_key is set: set "
                                  "api_key=... (or LIBINFER_API_KEY), or allow_unauthenticated=true to serve it open")


def api_key(cfg) -> Optional[str]:
    """The configured key, else $LIBINFER_API_KEY (as vLLM's --api-key / VLLM_API_KEY); '' = none."""
    return cfg.get("api_key") or os.environ.get("LIBINFER_API_KEY") or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:          # a host name: it may resolve anywhere
        return False


# ------------------------------------------------------------------ API schema

HELP = {
    "temperature": "softmax temperature; 0 = argmax",
    "out_seq_length": "maximum generated tokens",
    "recompute": "no KV cache: recompute the whole sequence at each step",
    "greedy": "argmax decoding",
    "top_p": "nucleus sampling mass in (0, 1]",
    "top_k": "keep the k most likely tokens; 0 = off",
    "repetition_penalty": "divide the logits of tokens already seen; 1 = off",
    "stop_sequences": "stop when the completion contains one of these",
    "start": "text injected after the prompt, before generation (e.g. \"\\nA:\")",
    "restart": "text appended after the completion (e.g. \"\\nQ:\")",
    "ignore_eos": "keep generating past end-of-sequence (speed runs)",
    "min_tokens": "EOS and stop sequences are ignored before this many tokens",
    "seed": "random seed; null = a fresh one per request",
    "n": "candidates per prompt",
    "logprobs": "null = off; k = each token's log-probability and the k most likely tokens (0-20)",
    "guided_json": "structured output: every completion validates against this JSON schema (object or JSON text)",
    "guided_regex": "structured output: every completion matches this regular expression in full",
    "guided_choice": "structured output: every completion is one of these strings",
}
PARAM_NAMES = [f.name for f in dataclasses.fields(GenerationParams)]



# JSON has lists, not tuples; a schema is an object or its JSON text.
API_TYPES = {"stop_sequences": list[str], "guided_choice": list[str], "guided_json": Union[str, dict[str, Any]]}

# Every GenerationParams field, optional (a missing one comes from the preset or the server's
# `generation` config). Strict types: "0.5" or "yes" are errors, not silently converted.
_hints = {k: API_TYPES.get(k, v) for k, v in typing.get_type_hints(GenerationParams).items()}
ParamsRequest = create_model(
    "ParamsRequest",
    __config__=ConfigDict(extra="forbid", strict=True),
    preset=(Optional[str], Field(None, description=f"start from a preset ({', '.join(PRESETS)}) instead of the "
                                                   "server's `generation` config; the fields below override it")),
    **{name: (Optional[_hints[name]], Field(None, description=HELP.get(name))) for name in PARAM_NAMES},
)


class GenerateRequest(ParamsRequest):
    prompt: Optional[str] = Field(None, description="one prompt (or use `prompts`)")
    prompts: Optional[list[str]] = Field(None, description="several prompts, generated as one batch")


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(TopLogprob):
    top: list[TopLogprob]              # the `logprobs` most likely tokens at that step


class Candidate(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str                 # stop | eos | length
    generated_tokens: int
    logprobs: Optional[list[TokenLogprob]] = None    # one per token id, when `logprobs` is set


class PromptResult(BaseModel):
    index: int
    prompt: str
    prompt_tokens: int
    candidates: list[Candidate]


class Timings(BaseModel):
    queue_s: float                     # waiting for the generator
    ttft_s: Optional[float]            # time to first token, from the start of generation
    generate_s: float                  # the generate call
    latency_s: float                   # queue + generate: what the client waited for, less the network
    prefill_s: float
    decode_s: float
    tokens_per_s: float                # generated tokens / generate_s
    decode_tokens_per_s: float
    prefill_tokens_per_s: float


class Usage(BaseModel):
    prompt_tokens: int
    generated_tokens: int


class GenerateResponse(BaseModel):
    model: str
    params: dict[str, Any]             # every GenerationParams field, as run
    results: list[PromptResult]
    usage: Usage
    timings: Timings
    hydra_overrides: str               # the same parameters for jobs.pipeline
    mlflow_run_id: Optional[str] = None


class OverridesResponse(BaseModel):
    params: dict[str, Any]
    hydra_overrides: str


# ------------------------------------------------------------ Hydra override line

def hydra_overrides(params: GenerationParams, group: str = "generation") -> str:
    """`generation.temperature=0.0 generation.top_p=0.8 ...`: every field, quoted so that bash
    passes each override as one argument and Hydra parses it back to exactly this value."""
    return " ".join(shell_quote(f"{group}.{k}={hydra_value(v)}") for k, v in params.to_dict().items())


def hydra_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    # OmegaConf first: `${` starts an interpolation unless escaped, and backslashes right
    # before it escape each other. Then Hydra's quoted string: backslashes are literal except
    # before a quote or at the end. (Hydra does not read \n as a newline; shell_quote does.)
    s = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", str(v))
    s = re.sub(r"(\\+)(?=\"|$)", lambda m: m.group(1) * 2, s).replace('"', '\\"')
    return f'"{s}"'


def shell_quote(word: str) -> str:
    """One bash word: bare when safe, '...' when printable, $'...' when it holds a control
    character (a newline in a stop sequence must reach Hydra as a real newline)."""
    if re.fullmatch(r"[\w.=,:/+@%-]+", word, re.ASCII):
        return word
    if not any(ord(c) < 32 or ord(c) == 127 for c in word):
        return "'" + word.replace("'", "'\\''") + "'"
    named = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "$'" + "".join(named.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c)
                          for c in word) + "'"


# ------------------------------------------------------------------- the queue

class QueueFull(RuntimeError):
    pass


class GeneratorQueue:
    """The one generator behind a bounded queue, run by a single worker thread."""

    def __init__(self, generator, max_queue: int):
        self.generator = generator
        self.limit = max_queue + 1                   # the running request + those waiting
        self.admitted = 0                            # touched on the event loop only
        self.running = False
        self.served = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - int(self.running))

    async def run(self, prompts: list, params: GenerationParams, on_token=None):
        """(results, seconds waited in the queue); QueueFull when `max_queue` are waiting.
        on_token(TokenEvent) is called in the worker thread after every token (streaming)."""
        if self.admitted >= self.limit:
            raise QueueFull(f"the generator is busy: {self.admitted - 1} requests are waiting (max_queue)")
        loop = asyncio.get_running_loop()
        self.admitted += 1
        t0 = time.perf_counter()
        fut = self._pool.submit(self._work, prompts, params, t0, on_token)
        # Released when the work itself ends, even if the client has gone away meanwhile.
        fut.add_done_callback(lambda _: self._release_soon(loop))
        return await asyncio.wrap_future(fut)

    def _work(self, prompts, params, t_submit, on_token=None):
        waited = time.perf_counter() - t_submit
        self.running = True
        try:
            return self.generator.generate(prompts, params, on_token=on_token), waited
        finally:
            self.running = False
            self.served += 1

    def _release(self) -> None:
        self.admitted -= 1

    def _release_soon(self, loop) -> None:
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:        # the loop is gone: the server is shutting down
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------- the app

def unprocessable(loc: list, msg: str):
    """A 422 in FastAPI's own validation-error shape, so clients read one format."""
    from fastapi import HTTPException
    return HTTPException(422, detail=[{"type": "value_error", "loc": ["body", *loc], "msg": msg}])


def create_app(cfg, generator, model_name: Optional[str] = None):
    """The FastAPI app around one loaded generator; `cfg` is the composed playground config."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    name = model_name or cfg.model.name
    server_params = generation_params(cfg.generation)     # a guided_json file path is read, as jobs.generate does
    queue = GeneratorQueue(generator, cfg.max_queue)
    key = api_key(cfg)
    created = int(time.time())
    mlflow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        queue.close()
        mlflow_pool.shutdown(wait=True)

    app = FastAPI(title="libinfer playground", lifespan=lifespan,
                  description="Try prompts with every generation parameter, then run the same set with "
                              "jobs.pipeline. Requests share one generator through a bounded queue.")
    app.state.queue = queue
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(OpenAIError)
    async def openai_error(request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    if key:
        @app.middleware("http")
        async def require_key(request, call_next):
            """Every /v1/* route needs the key; the page, its files, /healthz and /docs do not
            (the page asks for the key and sends it on its own /v1 calls)."""
            if request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    e = OpenAIError(401, "Incorrect or missing API key: send `Authorization: Bearer <api_key>`",
                                    code="invalid_api_key")
                    return JSONResponse({**e.body(), "detail": e.message}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    def resolve_params(req) -> GenerationParams:
        given = req.model_dump(exclude_unset=True, include=set(PARAM_NAMES))
        if req.preset is not None and req.preset not in PRESETS:
            raise unprocessable(["preset"], f"unknown preset {req.preset!r}; known: {', '.join(PRESETS)}")
        try:
            params = (PRESETS[req.preset] if req.preset else server_params).replace(**given)
        except ParamError as e:
            raise unprocessable([e.field], str(e)) from None
        if params.n > cfg.max_n:
            raise unprocessable(["n"], f"at most {cfg.max_n} candidates per prompt here (max_n; got {params.n})")
        if params.out_seq_length > cfg.max_out_seq_length:
            raise unprocessable(["out_seq_length"], f"at most {cfg.max_out_seq_length} tokens here "
                                                    f"(max_out_seq_length; got {params.out_seq_length})")
        return params

    def prompt_list(req) -> tuple[list[str], list]:
        """The prompts and the location of each one in the request body."""
        if (req.prompt is None) == (req.prompts is None):
            raise unprocessable(["prompt"], "give exactly one of `prompt` or `prompts`")
        if req.prompt is not None:
            prompts, locs = [req.prompt], [["prompt"]]
        else:
            prompts, locs = req.prompts, [["prompts", i] for i in range(len(req.prompts))]
        if not 1 <= len(prompts) <= cfg.max_prompts:
            raise unprocessable(["prompts"], f"give 1 to {cfg.max_prompts} prompts (max_prompts; got {len(prompts)})")
        for p, loc in zip(prompts, locs):
            if len(p) > cfg.max_prompt_chars:
                raise unprocessable(loc, f"prompt too long: {len(p)} characters, at most {cfg.max_prompt_chars} "
                                         "(max_prompt_chars)")
        return prompts, locs

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": name, "running": queue.running, "waiting": queue.waiting,
                "max_queue": cfg.max_queue, "served": queue.served, "auth": bool(key)}

    def model_card() -> dict:
        """OpenAI's model object (id, object, created, owned_by), then what the page shows."""
        c = generator.config
        return {
            "id": name, "object": "model", "created": created, "owned_by": "libinfer",
            "path": cfg.model.path, "gguf_file": cfg.model.gguf_file,
            "arch": c.arch, "n_params": c.n_params, "n_layers": c.n_layers, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "max_model_len": generator.max_model_len, "dtype": str(generator.dtype).removeprefix("torch."),
            "device": str(generator.device), "tp_size": cfg.model.tp_size,
            "load_s": round(generator.load_s, 3), "warmup_s": round(generator.warmup_s, 3)}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        check_model(model_id, name)
        return model_card()

    @app.get("/v1/presets")
    def presets():
        """`server` is what a request without `preset` starts from (the `generation` config)."""
        return {"server": server_params.to_dict(), **{k: p.to_dict() for k, p in PRESETS.items()}}

    @app.post("/v1/overrides", response_model=OverridesResponse)
    def overrides(req: ParamsRequest):
        params = resolve_params(req)
        return OverridesResponse(params=params.to_dict(), hydra_overrides=hydra_overrides(params))

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={422: {"description": "a bad parameter or prompt; `detail[].loc` names it"},
                         429: {"description": "the queue is full; retry later"}})
    async def generate(req: GenerateRequest):
        params = resolve_params(req)
        prompts, locs = prompt_list(req)
        t0 = time.perf_counter()
        try:
            results, waited = await queue.run(prompts, params)
        except QueueFull as e:     # FastAPI's `detail` for the page, OpenAI's `error` for clients
            return JSONResponse({"detail": str(e), **OpenAIError(429, str(e), code="rate_limit_exceeded").body()},
                                status_code=429, headers={"Retry-After": "1"})
        except Exception as e:  # noqa: BLE001 - say what failed instead of a bare 500
            log.exception("generation failed")
            raise HTTPException(500, detail=f"generation failed: {type(e).__name__}: {e}") from None
        latency = time.perf_counter() - t0
        rejected = [(loc, r.error) for loc, r in zip(locs, results) if not r.ok]
        if rejected:
            loc, error = rejected[0]
            raise unprocessable(loc, error)
        response = build_response(name, params, results, waited, latency, generator.tokenizer)
        if cfg.mlflow.enabled:
            loop = asyncio.get_running_loop()
            response.mlflow_run_id = await loop.run_in_executor(mlflow_pool, log_to_mlflow, cfg, params, response)
        return response

    add_openai_routes(app, cfg, queue, generator, name)
    return app


# ------------------------------------------------------------ the OpenAI routes

def check_model(requested: Optional[str], served: str) -> None:
    """One model per server: another name is a 404 (OpenAI's and vLLM's answer); none means ours."""
    if requested and requested != served:
        raise OpenAIError(404, f"The model `{requested}` does not exist; this server serves `{served}`",
                          param="model", code="model_not_found")


def add_openai_routes(app, cfg, queue: GeneratorQueue, generator, name: str) -> None:
    """POST /v1/completions and /v1/chat/completions on the playground's queue."""
    from fastapi.responses import StreamingResponse

    tokenizer = generator.tokenizer
    done = object()                     # end of a stream's events

    def prepare(url: str, body) -> tuple:
        """The parsed request and the generator's prompts, within this server's limits."""
        kind = _openai.ENDPOINTS[url]
        req = _openai.parse_body(url, body, default_max_tokens=cfg.max_out_seq_length if kind == "chat" else None)
        check_model(req.model, name)
        p = req.params
        tokens_param = "max_tokens" if kind == "completions" or "max_completion_tokens" not in body else \
            "max_completion_tokens"
        if p.n > cfg.max_n:
            raise _openai.bad("n", f"at most {cfg.max_n} choices per prompt here (max_n; got {p.n})")
        if p.out_seq_length > cfg.max_out_seq_length:
            raise _openai.bad(tokens_param, f"at most {cfg.max_out_seq_length} tokens here "
                                            f"(max_out_seq_length; got {p.out_seq_length})")
        where = "prompt" if kind == "completions" else "messages"
        if req.n_prompts > cfg.max_prompts:
            raise _openai.bad(where, f"at most {cfg.max_prompts} prompts per request here (max_prompts; "
                                     f"got {req.n_prompts})")
        chars = sum(len(m["content"]) for m in req.prompt) if kind == "chat" else \
            max(len(x) for x in _openai._completion_prompts(req.prompt))
        if chars > cfg.max_prompt_chars:
            raise _openai.bad(where, f"too long: {chars} characters, at most {cfg.max_prompt_chars} (max_prompt_chars)")
        inputs = _openai.prompt_inputs(req, tokenizer)
        if kind == "chat" and not req.max_tokens_set:       # no max_tokens: up to the context, as vLLM does
            room = generator.max_model_len - len(inputs[0]) - len(tokenizer(p.start, add_special_tokens=False).input_ids)
            if 1 <= room < p.out_seq_length:
                try:
                    req.params = p.replace(out_seq_length=room)
                except ParamError as e:
                    raise _openai.bad(e.field, str(e).split(": ", 1)[-1]) from None
        return req, inputs

    async def read_body(request: Request):
        try:
            return await request.json()
        except ValueError:
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None

    async def run(req, inputs, on_token=None):
        try:
            return (await queue.run(inputs, req.params, on_token))[0]
        except QueueFull as e:
            raise OpenAIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except Exception as e:  # noqa: BLE001 - say what failed instead of a bare 500
            log.exception("generation failed")
            raise OpenAIError(500, f"generation failed: {type(e).__name__}: {e}") from None

    async def endpoint(request: Request):
        url = request.url.path
        req, inputs = prepare(url, await read_body(request))
        request_id, created = _openai.new_request_id(req.kind), int(time.time())
        if req.stream:
            return await stream(req, inputs, request_id, created)
        results = await run(req, inputs)
        error = _openai.row_error(req, results)
        if error is not None:
            raise error
        return _openai.response_body(req, results, name, tokenizer, request_id, created)

    async def stream(req, inputs, request_id: str, created: int):
        """Server-sent events. Generation starts before the response does: a full queue or a
        prompt the generator rejects is still an HTTP error, not a broken stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(run(req, inputs, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)))
        # Token events are queued by the worker before the call returns, so `done` comes last.
        task.add_done_callback(lambda _: events.put_nowait(done))
        first = await events.get()
        if first is done:
            results = task.result()                              # raises OpenAIError (429, 500)
            error = _openai.row_error(req, results)
            if error is not None:
                raise error
        return StreamingResponse(sse(req, first, events, task, request_id, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sse(req, first, events, task, request_id, created):
        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(index, **kw) -> str:
            return data(_openai.chunk_body(req, request_id, created, name, index, **kw))

        n, with_logprobs = req.params.n, req.params.logprobs is not None
        if req.kind == "chat":                                   # each choice's first delta names the role
            for index in range(req.n_prompts * n):
                yield chunk(index, role=True)
        texts: dict[int, _openai.TextStream] = {}
        held: dict[int, tuple[str, str]] = {}                    # index -> (last text, finish) until logprobs
        item = first
        while item is not done:
            index = item.index * n + item.candidate
            ts = texts.setdefault(index, _openai.TextStream(generator.decode_text, req.params))
            if item.finish_reason is None:
                delta = ts.push(item.token_id)
                if delta:
                    yield chunk(index, text=delta)
            elif with_logprobs:       # the logprobs are in the finished output: the choice ends with the call
                held[index] = (ts.finish(item.text), item.finish_reason)
            else:
                yield chunk(index, text=ts.finish(item.text), finish_reason=item.finish_reason)
            item = await events.get()
        try:
            results = task.result()
        except OpenAIError as e:
            yield data(e.body())
            return
        error = _openai.row_error(req, results)
        if error is not None:                                    # another prompt of the request was rejected
            yield data(error.body())
            return
        for r in results:
            for j in range(len(r.outputs)):
                index = r.index * n + j
                if index in held:
                    text, reason = held[index]
                    yield chunk(index, text=text, finish_reason=reason,
                                logprobs=_openai.choice_logprobs(req, r, j, tokenizer))
        if req.include_usage:
            yield data(_openai.usage_chunk(req, request_id, created, name, results))
        yield "data: [DONE]\n\n"

    for url in _openai.ENDPOINTS:
        app.add_api_route(url, endpoint, methods=["POST"], summary=f"OpenAI {_openai.ENDPOINTS[url]} (jobs/_openai.py)",
                          responses={400: {"description": "a bad value; `error.param` names it"},
                                     401: {"description": "missing or wrong API key"},
                                     404: {"description": "another model's name"},
                                     429: {"description": "the queue is full; retry later"}})


def build_response(model: str, params: GenerationParams, results, waited: float, latency: float,
                   tokenizer=None) -> GenerateResponse:
    m = results.metrics
    text = _openai.TokenText(tokenizer).text if tokenizer is not None else str

    def logprobs(o):
        if o.logprobs is None:
            return None
        return [TokenLogprob(token_id=t.token_id, token=text(t.token_id), logprob=t.logprob,
                             top=[TopLogprob(token_id=i, token=text(i), logprob=lp) for i, lp in t.top])
                for t in o.logprobs]

    return GenerateResponse(
        model=model, params=params.to_dict(), hydra_overrides=hydra_overrides(params),
        results=[PromptResult(index=r.index, prompt=r.prompt, prompt_tokens=len(r.prompt_token_ids),
                              candidates=[Candidate(text=o.text, token_ids=o.token_ids, finish_reason=o.finish_reason,
                                                    generated_tokens=len(o.token_ids), logprobs=logprobs(o))
                                          for o in r.outputs])
                 for r in results],
        usage=Usage(prompt_tokens=m.prompt_tokens, generated_tokens=m.generated_tokens),
        timings=Timings(queue_s=waited, ttft_s=min(m.ttft_s) if m.ttft_s else None, generate_s=m.wall_s,
                        latency_s=latency, prefill_s=m.prefill_s, decode_s=m.decode_s, tokens_per_s=m.tokens_per_s,
                        decode_tokens_per_s=m.decode_tokens_per_s, prefill_tokens_per_s=m.prefill_tokens_per_s))


def log_to_mlflow(cfg, params: GenerationParams, response: GenerateResponse) -> Optional[str]:
    """One MLflow run per Generate, with the same param names as a jobs.pipeline run
    (generation.*, model.*) so the two compare side by side; a tracking failure is logged,
    never turned into a failed request."""
    from jobs._tracking import log_metrics, mlflow_run
    try:
        import mlflow
        run_cfg = OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True),
                                    "generation": params.to_dict(),
                                    "mlflow": OmegaConf.to_container(cfg.mlflow, resolve=True)})
        with mlflow_run(run_cfg, "playground", tags={"hydra_overrides": response.hydra_overrides[:5000]}) as run:
            log_metrics({**response.timings.model_dump(), **response.usage.model_dump()})
            mlflow.log_text(json.dumps([r.model_dump() for r in response.results], ensure_ascii=False, indent=1),
                            "outputs.json")
            return run.info.run_id
    except Exception:  # noqa: BLE001
        log.exception("MLflow logging failed")
        return None


# ------------------------------------------------------------------- entry point

def _main(cfg) -> None:
    import torch
    import uvicorn
    from jobs._model import build_generator
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    generator = build_generator(cfg.model)
    log.info("model %s loaded in %.1fs (warm-up %.1fs)", cfg.model.name, time.perf_counter() - t0, generator.warmup_s)
    app = create_app(cfg, generator)
    print(f"playground: http://{cfg.host}:{cfg.port}/  (API docs at /docs; Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, log_level="info")
    finally:
        generator.close()


@hydra.main(config_path="../conf", config_name="playground", version_base=None)
def main(cfg) -> None:
    from jobs._spark import entry_point
    entry_point(_main)(cfg)


if __name__ == "__main__":
    main()
