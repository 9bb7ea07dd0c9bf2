"""OpenAI's completions and chat formats on libinfer: a request body -> GenerationParams
and prompts, results -> the response body (whole, or as stream chunks).

One module for both users of the format: jobs.playground serves it over HTTP
(`/v1/completions`, `/v1/chat/completions`) and the batch-file job reads it line by line
(`data.format=openai_batch`). Neither knows the format's details; both call
`parse_body` -> `prompt_inputs` -> Generator.generate -> `response_body`.

What a body may hold, and why:
- OpenAI's parameters map onto GenerationParams: `max_tokens` (chat also
  `max_completion_tokens`) -> out_seq_length, `temperature` (0 = greedy), `top_p`, `n`,
  `stop` (a string or a list), `seed`, `logprobs` (completions: an int k) / `logprobs` +
  `top_logprobs` (chat), `response_format` (`text`, `json_object`, `json_schema`).
- vLLM's extra fields, for what OpenAI has no name for: `guided_json`, `guided_regex`,
  `guided_choice`, `top_k` (-1 or 0 = off), `repetition_penalty`, `min_tokens`, `ignore_eos`.
- Accepted and ignored, because they never change the output: `user`, `metadata`,
  `store`, `service_tier`, `safety_identifier`, `prompt_cache_key`, `parallel_tool_calls`.
- Accepted only at their no-op value (else 400 naming them, never silently ignored):
  `presence_penalty`/`frequency_penalty` 0, `logit_bias` {}, `echo` false, `suffix` "",
  `best_of` equal to n, `tools`/`functions` empty, `tool_choice`/`function_call`
  "none"/"auto", `modalities` ["text"], `audio`/`prediction`/`reasoning_effort`/
  `web_search_options`/`verbosity` null.
- Anything else is a 400 "Unrecognized request argument supplied: X", as OpenAI answers.
A null value means "left out" for every field, as in OpenAI's API.

Defaults: a field the body leaves out comes from `base` (the batch job's `generation`
config) or, without one, OpenAI's defaults (temperature 1, top_p 1, 16 tokens, no stop,
no penalty), never from the talk's presets: an unmodified OpenAI client gets OpenAI's
semantics. `default_max_tokens` overrides the 16 (the server gives chat requests its
`max_out_seq_length`, cut to the context, as vLLM does up to the context).

Prompts: completions take a string, a list of strings, a list of token ids or a list of
such lists; several prompts run as one batch and choices are indexed prompt-major
(`index = prompt * n + candidate`), as OpenAI does. Chat messages go through the model's
chat template with the generation prompt; a message's content is a string or a list of
`{"type": "text"}` parts (joined with "\\n", as vLLM does); other part types, tool
messages and tool calls are refused.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from libinfer import GenerationParams, GuideError, ParamError, from_response_format

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
OBJECTS = {"completions": ("text_completion", "text_completion"), "chat": ("chat.completion", "chat.completion.chunk")}
ID_PREFIX = {"completions": "cmpl-", "chat": "chatcmpl-"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}   # ours -> OpenAI's
OPENAI_DEFAULTS = GenerationParams(temperature=1.0, top_p=1.0, out_seq_length=16)
MAX_TEMPERATURE = 2.0                 # OpenAI's range is [0, 2]


class OpenAIError(Exception):
    """An error in OpenAI's shape: HTTP `status`, `type`, the parameter at fault."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, type: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or self.TYPES.get(status, "invalid_request_error")
        self.code = code
        self.headers = headers             # HTTP headers to send with it (Retry-After for a 429)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


@dataclass
class OpenAIRequest:
    kind: str                          # "completions" | "chat"
    model: Optional[str]               # None: whatever model serves it
    prompt: Any                        # completions: str, list[str], list[int] or list[list[int]]; chat: messages
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False        # stream_options.include_usage: a last chunk with usage
    user: Optional[str] = None
    max_tokens_set: bool = False       # the body said how many tokens (else the default, which a server may cut)
    extra: dict = field(default_factory=dict)   # accepted fields that change nothing (user, metadata, ...)

    @property
    def n_prompts(self) -> int:
        return len(_completion_prompts(self.prompt)) if self.kind == "completions" else 1


# ------------------------------------------------------------------ request parsing

IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "parallel_tool_calls"}
NOOP = {   # field -> does this value leave the output unchanged?
    "presence_penalty": lambda v: _is_num(v) and v == 0,
    "frequency_penalty": lambda v: _is_num(v) and v == 0,
    "logit_bias": lambda v: v == {},
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),
    "function_call": lambda v: v in ("none", "auto"),
    "modalities": lambda v: v == ["text"],
}
NOOP_NULL_ONLY = {"audio", "prediction", "reasoning_effort", "web_search_options", "verbosity"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "response_format", "guided_json", "guided_regex", "guided_choice", "top_k", "repetition_penalty",
          "min_tokens", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias"} | IGNORED
FIELDS = {"completions": COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"},
          "chat": COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                            "functions", "function_call", "modalities"} | NOOP_NULL_ONLY}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _take(body: dict, name: str, ok: Callable[[Any], bool], what: str):
    v = body[name]
    if not ok(v):
        raise bad(name, f"must be {what} (got {json.dumps(v)[:200]})")
    return v


def parse_body(url: str, body: dict, base: Optional[GenerationParams] = None, *,
               default_max_tokens: Optional[int] = None) -> OpenAIRequest:
    """Validate an OpenAI request body for the endpoint `url` (a key of ENDPOINTS);
    OpenAIError(400) names the parameter at fault."""
    kind = ENDPOINTS.get(url)
    if kind is None:
        raise OpenAIError(404, f"unknown endpoint {url!r}; known: {', '.join(ENDPOINTS)}", param="url")
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    for name in sorted(set(body) & (set(NOOP) | NOOP_NULL_ONLY)):
        if name in NOOP_NULL_ONLY or not NOOP[name](body[name]):
            raise bad(name, f"is not supported here (only its no-op value is accepted, got {json.dumps(body[name])[:200]})")

    changes: dict[str, Any] = {}
    names: dict[str, str] = {}              # GenerationParams field -> the body's name for it (error messages)

    def put(field_name: str, value, source: str) -> None:
        changes[field_name], names[field_name] = value, source

    model = _take(body, "model", lambda v: isinstance(v, str), "a string") if "model" in body else None
    if kind == "completions":
        prompt = _parse_prompt(body)
    else:
        prompt = _parse_messages(body)

    tokens_key = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    if len(tokens_key) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    if tokens_key:
        put("out_seq_length", _take(body, tokens_key[0], lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            tokens_key[0])
    elif default_max_tokens is not None:
        put("out_seq_length", default_max_tokens, "max_tokens")
    elif base is None:
        put("out_seq_length", OPENAI_DEFAULTS.out_seq_length, "max_tokens")
    if "temperature" in body:
        t = _take(body, "temperature", lambda v: _is_num(v) and 0 <= v <= MAX_TEMPERATURE,
                  f"a number in [0, {MAX_TEMPERATURE:g}]")
        put("temperature", float(t), "temperature")
        put("greedy", t == 0, "temperature")           # OpenAI has no greedy flag: temperature decides
    if "top_p" in body:
        put("top_p", _take(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"), "top_p")
    if "n" in body:
        put("n", _take(body, "n", lambda v: _is_int(v) and v >= 1, "an integer >= 1"), "n")
    if "best_of" in body:
        n = changes.get("n", (base or OPENAI_DEFAULTS).n)
        _take(body, "best_of", lambda v: _is_int(v) and v == n, f"equal to n ({n}): best_of > n is not supported")
    if "stop" in body:
        stop = body["stop"]
        ok = (isinstance(stop, str) and stop) or (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop))
        if not ok:
            raise bad("stop", f"must be a non-empty string or a list of non-empty strings (got {json.dumps(stop)[:200]})")
        put("stop_sequences", [stop] if isinstance(stop, str) else stop, "stop")
    if "seed" in body:
        put("seed", _take(body, "seed", _is_int, "an integer"), "seed")
    if "top_k" in body:
        k = _take(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1 or 0: off)")
        put("top_k", max(k, 0), "top_k")
    if "repetition_penalty" in body:
        put("repetition_penalty", _take(body, "repetition_penalty", lambda v: _is_num(v) and v > 0, "a number > 0"),
            "repetition_penalty")
    if "min_tokens" in body:
        put("min_tokens", _take(body, "min_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0"), "min_tokens")
    if "ignore_eos" in body:
        put("ignore_eos", _take(body, "ignore_eos", lambda v: isinstance(v, bool), "true or false"), "ignore_eos")
    _parse_logprobs(kind, body, put)
    _parse_guides(body, put)

    stream = _take(body, "stream", lambda v: isinstance(v, bool), "true or false") if "stream" in body else False
    include_usage = False
    if "stream_options" in body:
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
        opts = _take(body, "stream_options", lambda v: isinstance(v, dict), "an object")
        extra = sorted(set(opts) - {"include_usage"})
        if extra:
            raise bad(f"stream_options.{extra[0]}", "is not supported (only include_usage)")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", "must be true or false")

    try:
        params = (base or OPENAI_DEFAULTS).replace(**changes)
    except ParamError as e:
        param = names.get(e.field, e.field)
        raise bad(param, str(e).split(": ", 1)[-1]) from None
    user = body.get("user")
    return OpenAIRequest(kind=kind, model=model, prompt=prompt, params=params, stream=stream,
                         include_usage=include_usage, user=user if isinstance(user, str) else None,
                         max_tokens_set=bool(tokens_key), extra={k: body[k] for k in IGNORED if k in body})


def _parse_prompt(body: dict):
    if "prompt" not in body:
        raise bad("prompt", "is required")
    p = body["prompt"]
    if isinstance(p, list) and not p:
        raise bad("prompt", "must not be an empty list")
    try:
        _completion_prompts(p)
    except TypeError:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of token-id lists") \
            from None
    return p


def _completion_prompts(p) -> list:
    """The prompts of a completions `prompt` field, each a string or a token-id list."""
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(s, str) for s in p):
        return list(p)
    if isinstance(p, list) and p and all(isinstance(s, list) and s and all(_is_int(t) for t in s) for s in p):
        return list(p)
    raise TypeError("prompt")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _parse_messages(body: dict) -> list[dict]:
    """The messages as the chat template reads them: role and string content (and name)."""
    if "messages" not in body:
        raise bad("messages", "is required")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with 'role' and 'content'")
        m = {k: v for k, v in m.items() if v is not None}
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"{where}.{extra[0]}", "is not supported (tool calls and audio are not)")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)} (got {json.dumps(role)})")
        content = m.get("content", "" if role == "assistant" else None)
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad(f"{where}.content[{j}].type", f"only text parts are supported (got {json.dumps(kind)})")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string or a list of text parts")
        msg = {"role": ROLES[role], "content": content}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise bad(f"{where}.name", "must be a string")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _parse_logprobs(kind: str, body: dict, put) -> None:
    if kind == "completions":
        if "logprobs" in body:
            put("logprobs", _take(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= 20, "an integer in [0, 20]"),
                "logprobs")
        return
    want = _take(body, "logprobs", lambda v: isinstance(v, bool), "true or false") if "logprobs" in body else False
    if "top_logprobs" in body:
        k = _take(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= 20, "an integer in [0, 20]")
        if not want:
            raise bad("top_logprobs", "needs logprobs: true")
        put("logprobs", k, "top_logprobs")
    elif want:
        put("logprobs", 0, "logprobs")


def _parse_guides(body: dict, put) -> None:
    given = [k for k in ("guided_json", "guided_regex", "guided_choice") if k in body]
    try:
        from_rf = from_response_format(body.get("response_format"))
    except GuideError as e:
        raise bad(e.field, str(e).split(": ", 1)[-1]) from None
    if from_rf and given:
        raise bad(given[0], "give response_format or a guided_* field, not both")
    if len(given) > 1:
        raise bad(given[1], f"only one guide per request ({given[0]} is set too)")
    for k, v in from_rf.items():
        put(k, v, "response_format")
    for k in given:
        v = body[k]
        if k == "guided_json" and not isinstance(v, (dict, str)):
            raise bad(k, "must be a JSON schema (an object, or its JSON text)")
        if k == "guided_regex" and not isinstance(v, str):
            raise bad(k, "must be a string")
        if k == "guided_choice" and not (isinstance(v, list) and v and all(isinstance(c, str) for c in v)):
            raise bad(k, "must be a non-empty list of strings")
        put(k, v, k)


# ------------------------------------------------------------------------ prompts

def prompt_text(req: OpenAIRequest, tokenizer) -> str:
    """The prompt as text: for chat, the chat template with the generation prompt; for
    completions, the one prompt as given (400 when the request holds several or token ids:
    use `prompt_inputs`)."""
    if req.kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise bad("messages", "this model has no chat template: use /v1/completions")
        try:
            return tokenizer.apply_chat_template(req.prompt, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (e.g. roles out of order)
            raise bad("messages", f"the chat template refused them: {type(e).__name__}: {e}") from None
    prompts = _completion_prompts(req.prompt)
    if len(prompts) != 1 or not isinstance(prompts[0], str):
        raise bad("prompt", "holds several prompts or token ids: use prompt_inputs")
    return prompts[0]


def prompt_inputs(req: OpenAIRequest, tokenizer) -> list:
    """What Generator.generate takes, one entry per prompt. Chat prompts are token ids of
    the rendered template without the tokenizer's own special tokens: the template has
    its BOS/markers already, and a second BOS changes the output."""
    if req.kind == "chat":
        return [list(tokenizer(prompt_text(req, tokenizer), add_special_tokens=False).input_ids)]
    return [p if isinstance(p, str) else list(p) for p in _completion_prompts(req.prompt)]


def row_error(req: OpenAIRequest, outputs) -> Optional[OpenAIError]:
    """The first rejected prompt (too long for the context, empty, ...) as a 400, or None."""
    for r in outputs:
        if r.error is not None:
            many = req.kind == "completions" and len(outputs) > 1
            param = f"prompt[{r.index}]" if many else ("messages" if req.kind == "chat" else "prompt")
            return OpenAIError(400, f"{param}: {r.error}", param=param)
    return None


# ------------------------------------------------------------------------ answers

def usage(outputs) -> dict:
    """Each prompt counted once (whatever n), every generated token (EOS included)."""
    p = sum(len(r.prompt_token_ids) for r in outputs)
    c = sum(len(o.token_ids) for r in outputs for o in r.outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def response_body(req: OpenAIRequest, outputs, model: str, tokenizer, request_id: str, created: int) -> dict:
    """The non-streaming answer; `outputs` is Generator.generate's list (one RequestOutput
    per prompt of `prompt_inputs`; check `row_error` first: a rejected prompt has no choices)."""
    choices = []
    for r in outputs:
        for j, o in enumerate(r.outputs):
            index = r.index * req.params.n + j
            lp = _logprobs(req, o, tokenizer, _prompt_chars(r, tokenizer))
            if req.kind == "completions":
                choices.append({"index": index, "text": o.text, "logprobs": lp,
                                "finish_reason": FINISH_REASONS[o.finish_reason]})
            else:
                choices.append({"index": index, "message": {"role": "assistant", "content": o.text, "refusal": None},
                                "logprobs": lp, "finish_reason": FINISH_REASONS[o.finish_reason]})
    return {"id": request_id, "object": OBJECTS[req.kind][0], "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage(outputs)}


def chunk_body(req: OpenAIRequest, request_id: str, created: int, model: str, index: int, *,
               text: Optional[str] = None, finish_reason: Optional[str] = None, logprobs=None,
               role: bool = False) -> dict:
    """One stream chunk for choice `index`: a text delta, and/or its finish (our finish
    reason, mapped to OpenAI's) and logprobs (already in the endpoint's shape). Chat's first
    chunk of a choice carries the role (`role=True`)."""
    reason = FINISH_REASONS[finish_reason] if finish_reason else None
    if req.kind == "completions":
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    else:
        delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    body = {"id": request_id, "object": OBJECTS[req.kind][1], "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None                       # OpenAI: null on every chunk but the last
    return body


def usage_chunk(req: OpenAIRequest, request_id: str, created: int, model: str, outputs) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, usage."""
    return {"id": request_id, "object": OBJECTS[req.kind][1], "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage(outputs)}


def choice_logprobs(req: OpenAIRequest, request_output, j: int, tokenizer):
    """Candidate j's logprobs in the endpoint's shape (None when not asked)."""
    return _logprobs(req, request_output.outputs[j], tokenizer, _prompt_chars(request_output, tokenizer))


def _prompt_chars(r, tokenizer) -> int:
    return len(r.prompt) if r.prompt is not None else len(tokenizer.decode(r.prompt_token_ids,
                                                                           skip_special_tokens=True))


def _logprobs(req: OpenAIRequest, out, tokenizer, prompt_chars: int):
    if req.params.logprobs is None or out.logprobs is None:
        return None
    tok = TokenText(tokenizer)
    if req.kind == "completions":
        # text_offset: each token's first character, counted from the start of the prompt (OpenAI's way).
        offsets, ids = [], out.token_ids
        for i in range(len(ids)):
            offsets.append(prompt_chars + len(tokenizer.decode(ids[:i], skip_special_tokens=True)))
        return {"tokens": [tok.text(t.token_id) for t in out.logprobs],
                "token_logprobs": [t.logprob for t in out.logprobs],
                "top_logprobs": [{tok.text(i): lp for i, lp in t.top} for t in out.logprobs],
                "text_offset": offsets}

    def entry(i: int, lp: float) -> dict:
        return {"token": tok.text(i), "logprob": lp, "bytes": list(tok.bytes(i))}
    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in out.logprobs], "refusal": None}


class TokenText:
    """One token's text and bytes. Byte-level BPE tokens (GPT-2, Llama 3, SmolLM2) are
    mapped back through the byte alphabet, and `<0xHH>` byte-fallback tokens to their byte,
    so a character split over tokens has its real bytes (OpenAI's `bytes`); the text of such
    a piece is its lossy decode."""

    _BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._unbyte = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder):
            self._unbyte = {c: b for b, c in _bytes_to_unicode().items()}

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            m = self._BYTE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if self._unbyte is not None and all(c in self._unbyte for c in piece):
                return bytes(self._unbyte[c] for c in piece)
        return self.text(token_id).encode("utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies spell)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---------------------------------------------------------------------- streaming

class TextStream:
    """The text deltas of one streamed candidate. Each token re-decodes the candidate's
    tokens (a token's text depends on its neighbours) and sends what is new, holding back:
    the last (longest stop sequence - 1) characters, so a stop sequence the engine cuts is
    never sent; and a trailing incomplete UTF-8 character (decoded as U+FFFD). At the
    finish, the engine's final text (stop sequence cut, `restart` added) says what is left."""

    def __init__(self, decode: Callable[[list[int]], str], params: GenerationParams):
        self.decode = decode
        self.hold = max((len(s) for s in params.stop_sequences), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids).rstrip("\ufffd")
        safe = text[:max(len(self.sent), len(text) - self.hold)]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
        self.sent += delta
        return delta


def new_request_id(kind: str) -> str:
    import uuid
    return ID_PREFIX[kind] + uuid.uuid4().hex


__all__ = ["ENDPOINTS", "OpenAIError", "OpenAIRequest", "parse_body", "prompt_text", "prompt_inputs", "row_error",
           "response_body", "chunk_body", "usage_chunk", "choice_logprobs", "usage", "TextStream", "TokenText",
           "new_request_id", "FINISH_REASONS", "OPENAI_DEFAULTS"]
