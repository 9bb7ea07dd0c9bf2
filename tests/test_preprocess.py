"""jobs.preprocess: cleaning, parsing, length clustering, padding of the job's batches
(prefix clustering: test_prefix_clustering.py)."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import JOB_ROOT, mixed_corpus, write_jsonl
from jobs.preprocess import _SPACE_AROUND_NL, _SPACES, clean_text, collapse_whitespace, parse_record

CLEAN = {"unicode_form": "NFC", "strip_control": True, "collapse_whitespace": True, "strip": True}
DATA = {"format": "jsonl", "id_column": "id", "text_column": "prompt"}


def test_clean_text_normalises_unicode_controls_and_whitespace():
    assert clean_text("  e\u0301t\u00e9\x00\x07  a \t b\r\nQ:  x  ", CLEAN) == "\u00e9t\u00e9 a b\nQ: x"
    assert clean_text("keep\n\nblank lines", CLEAN) == "keep\n\nblank lines"
    assert clean_text(" raw\x01 ", {}) == " raw\x01 "


def test_collapse_whitespace_fast_paths_equal_the_regexes():
    # The substring checks skip the regex passes only where they cannot change the text: the
    # same result as always running them, on random texts of every whitespace kind.
    import random
    rng = random.Random(0)
    alphabet = ["a", "b", " ", " ", "\n", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003",
                "\u3000", "\u00e9"]
    for _ in range(5000):
        t = "".join(rng.choice(alphabet[:rng.choice((4, 5, len(alphabet)))]) for _ in range(rng.randrange(12)))
        want = _SPACE_AROUND_NL.sub("\n", _SPACES.sub(" ", t.replace("\r\n", "\n").replace("\r", "\n")))
        assert collapse_whitespace(t) == want, repr(t)


@pytest.mark.parametrize("value, want", [
    (b'{"id": 1, "prompt": "hi"}', ("1", "hi", None)),
    (b'{"id": "a", "prompt": null}', ("a", None, "null text (no 'prompt' value)")),
    (b'{"prompt": "x"}', (None, None, "missing id (null, empty or no 'id' field)")),
    (b'{"id": [1], "prompt": "x"}', (None, None, "bad id [1]: must be a string or integer")),
    (b'{"id": null, "prompt": "x"}', (None, None, "missing id (null, empty or no 'id' field)")),
    (b'{"id": 2, "prompt": 5}', ("2", None, "text is not a string: int")),
    (b'[1, 2]', (None, None, "not a JSON object: list")),
    (b'{"id": 3, "prompt": "\xff"}', (None, None, "invalid UTF-8 at byte 21")),
    (None, (None, None, "null record")),
])
def test_parse_record_reasons(value, want):
    assert parse_record(value, 7, DATA)[:3] == want


def test_parse_record_bad_json_keeps_raw():
    rid, text, reason, raw = parse_record(b'{"id": 1, "prompt": ', 0, DATA)
    assert reason.startswith("invalid JSON") and raw == '{"id": 1, "prompt": '


def test_clusters_by_length_and_reports_padding(spark, run_cfg, tmp_path):
    from jobs._spark import Output
    from jobs.preprocess import run_preprocess
    path = write_jsonl(tmp_path / "in.jsonl", mixed_corpus(48))
    cfg = run_cfg(f"data.path={path}", "data.cluster_by=length", "data.num_partitions=3", "model.max_batch_size=8")
    out = Output(spark, cfg.out)
    m = run_preprocess(spark, cfg, out)
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"], m["partitions"]) == (48, 48, 0, 3)
    assert out.complete("clustered")
    # Each partition file is sorted, and partitions cover disjoint length ranges (longest first).
    parts = [pd.read_parquet(f"{cfg.out}/clustered/{f}") for f in out.data_files("clustered")]
    parts = [p for p in parts if len(p)]
    assert len(parts) == 3
    for p in parts:
        assert list(p["n_tokens"]) == sorted(p["n_tokens"])
        assert all(len(t) == n for t, n in zip(p["token_ids"], p["n_tokens"]))
    ranges = sorted((p["n_tokens"].min(), p["n_tokens"].max()) for p in parts)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert m["padding_waste"] == m["padding_waste_sorted"] < m["padding_waste_unsorted"]
    assert sorted(pd.read_parquet(f"{cfg.out}/clustered")["id"]) == [f"r{i:03d}" for i in range(48)]
    # The Arrow lists written are the tokenizer's own ids of the text written.
    from jobs._spark import worker_tokenizer
    from omegaconf import OmegaConf
    tok, _ = worker_tokenizer(OmegaConf.to_container(cfg.model, resolve=True))
    whole = pd.concat(parts)
    assert [list(t) for t in whole["token_ids"]] == tok(list(whole["text"])).input_ids
    assert set(m["_breakdown"]) >= {"read_parse_tokenize", "families", "cluster_write", "quarantine_write", "stats"}
    assert m["_histogram"] == sorted(whole["n_tokens"].value_counts().items())


def test_unsorted_keeps_arrival_order(spark, run_cfg, tmp_path):
    from jobs._spark import Output
    from jobs.preprocess import run_preprocess
    path = write_jsonl(tmp_path / "in.jsonl", mixed_corpus(20))
    # The single-process comparison reads only its sample (the driver never holds the corpus).
    cfg = run_cfg(f"data.path={path}", "data.cluster_by=none", "data.num_partitions=2",
                  "compare_single_process=true", "data.single_process_sample=8")
    m = run_preprocess(spark, cfg, Output(spark, cfg.out))
    assert m["padding_waste"] == m["padding_waste_unsorted"] > m["padding_waste_sorted"]
    assert m["single_process_rows"] == 8 < m["rows_in"] == 20
    assert m["single_process_s"] > 0 and m["speedup_vs_single_process"] > 0
    assert m["driver_peak_rss_bytes"] > 0
    df = pd.read_parquet(f"{cfg.out}/clustered")
    assert list(df["row"]) == sorted(df["row"])


def test_text_and_parquet_inputs_template(spark, run_cfg, tmp_path):
    from jobs._spark import Output
    from jobs.preprocess import run_preprocess
    (tmp_path / "in.txt").write_text("first prompt\nsecond  prompt\n")
    cfg = run_cfg(f"data.path={tmp_path / 'in.txt'}", "data.format=text", "data.template='Q: {text}\\nA:'")
    run_preprocess(spark, cfg, Output(spark, cfg.out))
    df = pd.read_parquet(f"{cfg.out}/clustered").sort_values("id")
    assert list(df["id"]) == ["0", "1"] and list(df["text"]) == ["Q: first prompt\nA:", "Q: second prompt\nA:"]

    pd.DataFrame({"key": [10, 11], "body": ["a parquet prompt", None]}).to_parquet(tmp_path / "in.parquet")
    cfg = run_cfg(f"data.path={tmp_path / 'in.parquet'}", "data.format=parquet", "data.id_column=key",
                  "data.text_column=body", f"out={tmp_path / 'out2'}")
    m = run_preprocess(spark, cfg, Output(spark, cfg.out))
    assert (m["rows_out"], m["rows_quarantined"]) == (1, 1)
    q = pd.read_parquet(f"{cfg.out}/quarantine")
    assert list(q["id"]) == ["11"] and list(q["reason"]) == ["null text (no 'body' value)"]


def test_prepare_batch_keeps_token_ids_as_arrow_lists(tiny_model):
    """One Arrow batch through the first pass without Spark: token ids are a list<int32>
    array equal to the tokenizer's own ids, refused rows are null there, and the block hashes
    say which rows share which 16-token prefixes."""
    import pyarrow as pa
    from omegaconf import OmegaConf
    from jobs._spark import worker_tokenizer
    from jobs.preprocess import prepare_batch
    tok, context = worker_tokenizer(OmegaConf.to_container(tiny_model, resolve=True))
    head = "shared header words " * 8
    texts = [head + "first query", head + "second query", "short", head + "first query and more"]
    values = [f'{{"id": "a{i}", "prompt": "{t}"}}'.encode() for i, t in enumerate(texts)]
    values.insert(2, b'{"id": "bad", "prompt": ""}')
    data = {**DATA, "clean": CLEAN, "max_chars": 10_000, "template": None, "chat_template": False}
    out = prepare_batch(list(range(5)), values, data, tok, context)
    assert out.schema.field("token_ids").type == pa.list_(pa.int32())
    ids = out.column("token_ids").to_pylist()
    assert ids[2] is None and out.column("reason")[2].as_py().startswith("empty text")
    want = tok([clean_text(t, CLEAN) for t in texts]).input_ids
    assert [ids[i] for i in (0, 1, 3, 4)] == want
    assert out.column("n_tokens").to_pylist() == [len(want[0]), len(want[1]), None, len(want[2]), len(want[3])]
    blocks = out.column("blocks").to_pylist()
    for i in (0, 1, 3, 4):     # one hash per whole block
        assert len(blocks[i]) == len(ids[i]) // 16
    for i, j in [(0, 1), (0, 4), (1, 4), (0, 3)]:
        common = next((k for k, (x, y) in enumerate(zip(ids[i], ids[j])) if x != y), min(len(ids[i]), len(ids[j])))
        shared = sum(1 for a, b in zip(blocks[i], blocks[j]) if a == b)
        assert shared == common // 16, (i, j)


def test_chain_hashes_identify_whole_block_prefixes():
    import numpy as np
    from jobs.preprocess import chain_hashes
    rng = np.random.default_rng(0)
    base = rng.integers(0, 50, size=64)
    rows = [base, base[:48], np.r_[base[:32], base[32:] + 1], np.r_[base[:16], [0] * 16],  np.r_[base[:16], [0] * 15],
            np.zeros(32, dtype=int), np.zeros(15, dtype=int), base[16:]]
    offsets = np.r_[0, np.cumsum([len(r) for r in rows])]
    boff, h = chain_hashes(offsets, np.concatenate(rows).astype(np.int32))
    blocks = [list(h[a:b]) for a, b in zip(boff[:-1], boff[1:])]
    assert [len(b) for b in blocks] == [len(r) // 16 for r in rows]
    prefixes = {}
    for r, b in zip(rows, blocks):      # equal hash <=> equal token prefix
        for k, x in enumerate(b):
            prefixes.setdefault(x, set()).add(tuple(r[:16 * (k + 1)]))
    assert all(len(p) == 1 for p in prefixes.values())
    assert len(prefixes) == len({tuple(r[:16 * (k + 1)]) for r in rows for k in range(len(r) // 16)})


@pytest.mark.parametrize("which", ["tiny_random", "bundled_gguf"])
def test_tokenize_only_worker_needs_no_torch(which, tiny_model, job_env, tmp_path):
    """A preprocess worker that only batch-encodes builds its encoder from the entry a full
    tokenizer load left in the cache: the model's own ids, its context length, and neither
    torch nor transformers imported (their import is most of a fresh worker's start)."""
    import json
    import subprocess
    import sys
    from omegaconf import OmegaConf
    from jobs._spark import worker_tokenizer
    m = OmegaConf.to_container(tiny_model, resolve=True) if which == "tiny_random" else \
        {"path": None, "gguf_file": None}
    full, context = worker_tokenizer(m)          # a full load: writes the entry
    texts = ["Q: cheap flights tokyo\nA:", "  h\u00e9llo w\u00f6rld <|im_start|> x\n\n", "tok " * 200, "\uc548\ub155"]
    code = ("import json, sys\nfrom jobs._spark import worker_tokenizer\n"
            f"tok, ctx = worker_tokenizer(json.loads({json.dumps(json.dumps(m))}), light=True)\n"
            f"ids = [e.ids for e in tok.backend_tokenizer.encode_batch({texts!r}, add_special_tokens=True)]\n"
            "print(json.dumps([type(tok).__name__, ctx, ids, 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=job_env["env"], cwd=JOB_ROOT, capture_output=True,
                         text=True, check=True)
    kind, ctx, ids, torch_in, transformers_in = json.loads(out.stdout.strip().splitlines()[-1])
    assert (kind, ctx, torch_in, transformers_in) == ("FastTokenizer", context, False, False)
    assert ids == full(texts).input_ids
    # No entry (a fresh cache): the full tokenizer, which then writes one.
    fresh = dict(job_env["env"], LIBINFER_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=fresh, cwd=JOB_ROOT, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])[0] != "FastTokenizer"
    assert list((tmp_path / "cache" / "tokenizers").glob("*.fast.json"))


def test_job_drivers_import_no_torch(job_env):
    """The drivers of preprocess, generate and pipeline import, validate their config
    (model.quantization included) and resolve the generation parameters without torch:
    the model runs on the executors, and torch's import was ~1.5 s of every job's start."""
    import json
    import os
    import subprocess
    import sys
    code = ("import json, sys\nfrom hydra import compose, initialize_config_dir\nfrom jobs import _config\n"
            "def job_cfg(*o):\n    with initialize_config_dir(config_dir=sys.argv[1], version_base=None):\n"
            "        cfg = compose('config', overrides=list(o))\n    _config.validate(cfg)\n    return cfg\n"
            "import jobs.pipeline, jobs.generate, jobs.preprocess\nfrom jobs.generate import resolve_params\n"
            "cfg = job_cfg('model=smollm2_135m', 'model.dtype=bf16', 'model.quantization=int8')\n"
            "resolve_params(cfg)\n"
            "bad = None\ntry:\n    job_cfg('model=smollm2_135m', 'model.quantization=int4')\n"
            "except Exception as e:\n    bad = str(e)\n"
            "print(json.dumps(['torch' in sys.modules, 'transformers' in sys.modules, bad]))")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(JOB_ROOT, "conf")], env=job_env["env"],
                         cwd=JOB_ROOT, capture_output=True, text=True, check=True)
    torch_in, transformers_in, bad = json.loads(out.stdout.strip().splitlines()[-1])
    assert (torch_in, transformers_in) == (False, False)
    assert "model.quantization" in bad and "bfloat16" in bad     # float32 + int4 still refused
