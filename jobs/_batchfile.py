"""OpenAI Batch API files through the jobs (`data.format=openai_batch`): the lines in,
the rows' parameter sets, and OUT/openai/output.jsonl + errors.jsonl out.

A batch file holds one request a line, as OpenAI's Batch API and vLLM's run_batch read it:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}

What the body means is jobs/_openai.py's (the playground's OpenAI routes use the same
mapping): `parse_body` turns it into GenerationParams and a prompt, `prompt_inputs` into
what the generator takes (chat: the chat template's token ids), `response_body` shapes the
answer. This module adds what a file needs around it:

- The envelope (`read_line`): the line is a JSON object with exactly `custom_id` (a
  non-empty string), `method` ("POST"), `url` (a key of ENDPOINTS) and `body` (an object).
  A line that fails here is no request at all: its error line has `response: null`.
  A later line with the `custom_id` of an earlier one is refused as a duplicate (the first
  is kept, whatever becomes of it), so every line lands exactly once.
- What a body may not hold in a file: `stream` (true is refused: OpenAI's batch API
  refuses it too), and several prompts in one completions line (one line is one row of the
  job: put each prompt on its own line). Any other body error is parse_body's 400, naming
  the field; its error line carries the response OpenAI would give (status 400, the
  error body) and `error: {code, message}`.
- Defaults (`data.batch_defaults`): `openai` (the default) gives a field a line leaves
  out OpenAI's default (temperature 1, top_p 1, max_tokens 16 for both endpoints, no
  stop, no penalty), so a file means what it means to the API; the job's `generation`
  group (the demo's talk preset test1 by default) does not touch it. `generation` makes
  the job's `generation` group the defaults instead (the line's values win).
- Seeds: a sampled line without `seed` gets the job's seed (`generation.seed`, or one
  drawn at preprocess), so a retried task or a resumed run regenerates the same text;
  sampling is seeded per prompt and candidate, so lines sharing the seed still differ.
  A greedy line's seed is dropped (it changes nothing and would split its group).
- The row (preprocess): id = custom_id, text = the prompt as the model sees it (chat: the
  rendered template; no `data.clean`, `data.template` or `data.chat_template`: the line
  says what it wants), token_ids, plus `params` (the line's GenerationParams without its
  guide, canonical JSON: the key rows are clustered and grouped by), `guide` (its
  guided_json / guided_regex / guided_choice or null) and `request` ({url, body}: to
  shape the answer).
- Generating (`param_groups`): inside each chunk of a partition, one Generator.generate
  call per parameter set, each row with its own guide, so rows that differ only in their
  schema run in one call. Preprocess clusters by `params` first, then by prefix family
  and length, so a chunk mostly holds one set.
- Writing (`write_files`, at the end of jobs.generate): output.jsonl has one line per
  row in results/, errors.jsonl one per row in quarantine/ (both stages), in input order,
  written whole from those datasets at the end of every run (a resumed run rewrites them),
  so every line of the input is in exactly one of the two, once. Ids are derived from
  (row, custom_id): a rewrite gives the same `id` and `request_id`. The answer's `model`
  is the job's `model.name` (the line's `model` is accepted whatever it says).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional

from libinfer import GenerationParams
from libinfer.structured import GUIDE_FIELDS

from jobs import _openai
from jobs._openai import ENDPOINTS, OpenAIError

LINE_KEYS = ("custom_id", "method", "url", "body")
# What clustered/ rows carry beside the usual columns (results/ adds row and response,
# quarantine/ adds error).
CLUSTERED_EXTRA = ["params", "guide", "request"]


@dataclass
class Line:
    """One batch line, read: a request (prompt + params) or why it is none."""
    custom_id: Optional[str] = None
    text: Optional[str] = None            # the prompt as the model sees it
    token_ids: Optional[list] = None      # set when the line gives them or for chat (the template's ids)
    params: Optional[str] = None          # GenerationParams.to_dict() without the guide, canonical JSON
    guide: Optional[str] = None           # {"guided_json": ...} or null, JSON
    request: Optional[str] = None         # {"url": ..., "body": ...}, JSON
    reason: Optional[str] = None          # why the line cannot run (the message of its error line)
    error: Optional[str] = None           # the rest of its error line, JSON (see error_info)


def error_info(status: Optional[int], code: str, body: Optional[dict] = None) -> str:
    """What an error line needs beside its message: the HTTP status and body OpenAI would
    answer (None: the line is no request, its `response` is null) and the error code."""
    return json.dumps({"status": status, "code": code, "body": body})


def api_error(e: OpenAIError) -> tuple[str, str]:
    """(reason, error) of a request the API would answer with an error."""
    return e.message, error_info(e.status, e.code or e.type, e.body())


def line_error(code: str, message: str) -> tuple[str, str]:
    """(reason, error) of a line that is no request."""
    return message, error_info(None, code)


DUPLICATE = error_info(None, "duplicate_custom_id")


def base_params(cfg) -> Optional[dict]:
    """The defaults of a line's missing fields: None (OpenAI's) or the `generation` group."""
    if cfg.data.batch_defaults == "openai":
        return None
    from jobs._config import generation_params
    return generation_params(cfg.generation).to_dict()


def job_seed(cfg) -> int:
    """The seed of sampled lines that give none: generation.seed, else one drawn now."""
    seed = cfg.generation.get("seed")
    return int(seed) if seed is not None else random.getrandbits(31)


def parse_request(request: str, base: Optional[dict]) -> _openai.OpenAIRequest:
    """A stored `request` column back into the OpenAIRequest (on the executors)."""
    r = json.loads(request)
    return _openai.parse_body(r["url"], r["body"], GenerationParams.from_dict(base) if base else None)


def read_line(line: str, tokenizer, base: Optional[dict], seed: int) -> Line:
    """One decoded line -> Line (the request, or the reason it is none)."""
    out = Line()

    def refuse(reason_error: tuple[str, str]) -> Line:
        out.reason, out.error = reason_error
        return out

    try:
        rec = json.loads(line)
    except ValueError as e:
        return refuse(line_error("invalid_json", f"invalid JSON: {e}"))
    if not isinstance(rec, dict):
        return refuse(line_error("invalid_line", f"not a JSON object: {type(rec).__name__}"))
    cid = rec.get("custom_id")
    if cid is None or cid == "":
        return refuse(line_error("missing_custom_id", "custom_id: missing (null, empty or no field)"))
    if not isinstance(cid, str):
        return refuse(line_error("invalid_custom_id", f"custom_id: must be a string (got {json.dumps(cid)[:100]})"))
    out.custom_id = cid

    unknown = sorted(set(rec) - set(LINE_KEYS))
    if unknown:
        return refuse(line_error("invalid_line", f"{unknown[0]}: unknown field of a batch line "
                                                 f"(a line holds {', '.join(LINE_KEYS)})"))
    if rec.get("method") != "POST":
        return refuse(line_error("invalid_method", f"method: must be \"POST\" (got {json.dumps(rec.get('method'))})"))
    url = rec.get("url")
    if url not in ENDPOINTS:
        return refuse(line_error("invalid_url", f"url: must be one of {', '.join(ENDPOINTS)} "
                                                f"(got {json.dumps(url)[:200]})"))
    body = rec.get("body")
    if not isinstance(body, dict):
        return refuse(line_error("invalid_body", f"body: must be a JSON object (got {type(body).__name__})"))
    try:
        if body.get("stream") is True:
            raise _openai.bad("stream", "is not supported in a batch file (true is refused, as the Batch API does)")
        req = _openai.parse_body(url, body, GenerationParams.from_dict(base) if base else None)
        if req.n_prompts != 1:
            raise _openai.bad("prompt", f"holds {req.n_prompts} prompts: a batch line holds one (put each prompt on "
                                        f"its own line)")
        (prompt,) = _openai.prompt_inputs(req, tokenizer)
        if req.kind == "chat":
            out.text = _openai.prompt_text(req, tokenizer)
        elif isinstance(prompt, str):
            out.text = prompt
        else:
            out.text = tokenizer.decode(prompt)
        if not isinstance(prompt, str):
            out.token_ids = list(prompt)
    except OpenAIError as e:
        return refuse(api_error(e))
    params = req.params
    if params.is_greedy:
        params = params.replace(seed=None)
    elif params.seed is None:
        params = params.replace(seed=seed)
    d = params.to_dict()
    guide = {k: d[k] for k in GUIDE_FIELDS if d[k] is not None}
    d.update(dict.fromkeys(GUIDE_FIELDS))
    out.params = json.dumps(d, sort_keys=True)
    out.guide = json.dumps(guide, sort_keys=True) if guide else None
    out.request = json.dumps({"url": url, "body": body}, sort_keys=True)
    return out


def row_error_info(kind: str, reason: str) -> str:
    """The error of a row the job refused after reading it (too long, empty, the generator
    rejected it): a 400 on its prompt (or on the guide the message names)."""
    param = "messages" if kind == "chat" else "prompt"
    for g in GUIDE_FIELDS:
        if reason.startswith(g + ":"):
            param = g
    if reason.startswith("generator error"):
        e = OpenAIError(500, reason, code="generator_error")
    else:
        code = "context_length_exceeded" if reason.startswith(("prompt too long", "text too long")) else None
        e = OpenAIError(400, reason, param=param, code=code)
    return api_error(e)[1]


def request_kind(request: str) -> str:
    return ENDPOINTS[json.loads(request)["url"]]


# ------------------------------------------------------------------- generating

def param_groups(params: list[str], guides: list[Optional[str]]) -> list[tuple[GenerationParams, list[int], list]]:
    """Rows by parameter set: (params, the rows' indices, each row's guide or None), one
    Generator.generate call each."""
    by_key: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        by_key.setdefault(p, []).append(i)
    return [(GenerationParams.from_dict(json.loads(p)), rows,
             [json.loads(guides[i]) if isinstance(guides[i], str) else None for i in rows])   # null: NaN in pandas
            for p, rows in by_key.items()]


def line_ids(row: int, custom_id: Optional[str]) -> tuple[str, str]:
    """(id, request_id) of the output line of input row `row`: the same on every rewrite."""
    h = hashlib.sha256(f"{row}\0{custom_id}".encode()).hexdigest()
    return f"batch_req_{h[:32]}", f"req_{h[32:64]}"


def row_json(request: str, output, params: GenerationParams, batch_file: dict, tokenizer, row: int,
             custom_id: str, created: int) -> str:
    """What a generated row carries for the files, JSON: its response body (results), or
    the error info of a row the generator refused (quarantine). `output` is its
    RequestOutput, `params` those it ran with (n and logprobs shape the choices);
    batch_file = {"base", "model"}."""
    import dataclasses
    req = parse_request(request, batch_file["base"])
    if output.error is not None:
        return row_error_info(req.kind, output.error)
    req = dataclasses.replace(req, params=params)
    _, rid = line_ids(row, custom_id)
    output = dataclasses.replace(output, index=0)      # its index in the call, not in its request
    return json.dumps(_openai.response_body(req, [output], batch_file["model"], tokenizer,
                                            _openai.ID_PREFIX[req.kind] + rid[4:], created))


# ----------------------------------------------------------------------- output

def output_line(row: int, custom_id: str, response: str) -> str:
    bid, rid = line_ids(row, custom_id)
    return json.dumps({"id": bid, "custom_id": custom_id,
                       "response": {"status_code": 200, "request_id": rid, "body": json.loads(response)},
                       "error": None})


def error_line(row: int, custom_id: Optional[str], reason: str, error: Optional[str]) -> str:
    bid, rid = line_ids(row, custom_id)
    info = json.loads(error) if error else {"status": None, "code": "invalid_line", "body": None}
    response = None
    if info["status"] is not None:
        response = {"status_code": info["status"], "request_id": rid, "body": info["body"]}
    return json.dumps({"id": bid, "custom_id": custom_id, "response": response,
                       "error": {"code": info["code"], "message": reason}})


FILES = (("output.jsonl", "openai_output_lines", "results", ("row", "id", "response"), output_line),
         ("errors.jsonl", "openai_error_lines", "quarantine", ("row", "id", "reason", "error"), error_line))


def write_files(out) -> dict[str, int]:
    """OUT/openai/output.jsonl and errors.jsonl from OUT/results and OUT/quarantine, in
    input order, streamed partition by partition (the driver holds one partition)."""
    counts = {}
    for name, count, dataset, columns, fmt in FILES:
        df = out.read(dataset)
        lines = () if df is None else (fmt(*r) for r in df.select(*columns).orderBy("row").toLocalIterator())
        counts[count] = out.write_lines(f"openai/{name}", lines)
    return counts
