"""Shared fixtures. Models are loaded once per test session (GGUF dequantisation and the
transformers reference are the slow parts)."""
from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (./run test: -n 2) the workers share the cores: each takes its part.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def smollm2():
    """Our generator on the bundled SmolLM2-135M-Instruct GGUF, fp32 CPU."""
    from libinfer import Generator
    gen = Generator.from_pretrained(None, dtype="float32", device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own model from the same GGUF: the reference."""
    from transformers import AutoModelForCausalLM
    from libinfer import bundled_model
    folder, gguf_file = bundled_model()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """Two random-initialised configs as safetensors dirs: GQA + untied embeddings, and
    tied embeddings with a head_dim that is not hidden/heads."""
    from libinfer.lab.random_model import save_random_model
    root = tmp_path_factory.mktemp("random_models")
    return {
        "gqa_untied": save_random_model(root / "gqa_untied", seed=1, hidden_size=128, n_layers=3, n_heads=8,
                                        n_kv_heads=2, intermediate_size=320, tie_embeddings=False),
        "tied_headdim": save_random_model(root / "tied_headdim", seed=2, hidden_size=96, n_layers=2, n_heads=4,
                                          n_kv_heads=4, head_dim=32, intermediate_size=200, tie_embeddings=True),
    }


# ----------------------------------------------------------------- Spark job fixtures

JOB_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_cfg(*overrides: str):
    """The jobs' composed Hydra config (conf/config.yaml) with overrides, validated."""
    from hydra import compose, initialize_config_dir
    from jobs import _config
    with initialize_config_dir(config_dir=os.path.join(JOB_ROOT, "conf"), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    _config.validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def job_env(tmp_path_factory):
    """Environment for job subprocesses (Hydra's run dirs in tmp) and a per-session MLflow store."""
    root = tmp_path_factory.mktemp("jobs")
    env = dict(os.environ, HYDRA_RUN_ROOT=str(root / "hydra"), PYTHONUNBUFFERED="1")
    return {"root": root, "env": env, "mlflow_uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="session")
def tiny_model(job_env):
    """The tiny random model config written once (workers only read it)."""
    from jobs._model import ensure_model
    cfg = job_cfg("model=tiny_random")
    ensure_model(cfg.model)
    return cfg.model


@pytest.fixture(scope="session")
def spark(job_env, tiny_model):
    """One local[2] session (4 attempts per task) for the in-process job tests."""
    from jobs._spark import session
    s = session(job_cfg("spark=local2", "model=tiny_random"))
    yield s
    s.stop()


@pytest.fixture
def run_cfg(job_env, tmp_path):
    """job_cfg for this test: tiny model, local[2], MLflow in the session store, out in tmp."""
    def make(*overrides: str):
        return job_cfg("model=tiny_random", "spark=local2", f"mlflow.tracking_uri={job_env['mlflow_uri']}",
                       f"out={tmp_path / 'out'}", *overrides)
    return make


def write_jsonl(path, records) -> str:
    """Write records (dicts, or bytes for a raw line) as JSON lines; returns the path."""
    import json
    with open(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return str(path)


def mixed_corpus(n: int, seed: int = 0) -> list[dict]:
    """n prompts of widely mixed lengths (about 10 to 400 tokens)."""
    import random
    rng = random.Random(seed)
    words = "query search best cheap near review how to buy shoes bread coffee tea camera".split()
    return [{"id": f"r{i:03d}", "prompt": " ".join(rng.choice(words) for _ in range(rng.choice([5, 20, 60, 150, 300])))}
            for i in range(n)]


def read_out(out_dir):
    """(results, quarantine) DataFrames of a job output directory."""
    import pandas as pd
    res = os.path.join(out_dir, "results")
    q = os.path.join(out_dir, "quarantine")
    return (pd.read_parquet(res) if os.path.isdir(res) and any(not f.startswith(("_", ".")) for f in os.listdir(res))
            else pd.DataFrame(columns=["id"]),
            pd.read_parquet(q) if os.path.isdir(q) and any(not f.startswith(("_", ".")) for f in os.listdir(q))
            else pd.DataFrame(columns=["id", "row", "reason"]))


def assert_exactly_once(out_dir, input_ids: list) -> None:
    """Every input id is in exactly one of results/quarantine, once; nothing else is there."""
    from collections import Counter
    res, q = read_out(out_dir)
    import pandas as pd
    seen = Counter(list(res["id"]) + [i for i in q["id"] if not pd.isna(i)])
    want = Counter(str(i) for i in input_ids if i is not None)
    assert seen == want, (f"missing {sorted((want - seen).elements())[:10]} "
                          f"extra/duplicate {sorted((seen - want).elements())[:10]}")


def family_corpus(n: int, seed: int = 0) -> list[dict]:
    """n few-shot rows (`task` says whose): three tasks with fixed headers, of which two open
    with the same instruction and differ in their examples, each followed by a short query
    (many start with the same words), and some rows (task "solo") that share nothing."""
    import random
    rng = random.Random(seed)
    topics = "shoes bread coffee tea camera tents bikes boots desks kettles maps plants".split()
    intents = ["best {}", "cheap {}", "{} near me", "how to choose {}", "{} review", "where to buy {}"]

    def shots(k: int, salt: int) -> str:
        r = random.Random(salt)
        return "".join(f"Q: {r.choice(intents).format(t)}\nA: {', '.join(r.choice(intents).format(t) for _ in range(3))}"
                       "\n\n" for t in r.sample(topics, k))
    opening = "Suggest three related search queries for the query below, short, in lower case, separated by commas.\n\n"
    headers = {"rewrite": "Rewrite the question as three keyword queries for a search engine.\n\n" + shots(3, 1),
               "related": opening + shots(4, 2), "related_long": opening + shots(9, 3)}
    words = "query search best cheap near review how to buy shoes bread coffee tea camera".split()
    rows = []
    for i in range(n):
        task = rng.choice(["rewrite", "related", "related_long", "related_long", "solo"])
        if task == "solo":
            prompt = f"note {i}: " + " ".join(rng.choice(words) for _ in range(rng.choice([8, 30, 60])))
        else:
            prompt = f"{headers[task]}Q: {rng.choice(intents).format(rng.choice(topics))}\nA:"
        rows.append({"id": f"f{i:03d}", "prompt": prompt, "task": task})
    return rows
