"""jobs.finetune end to end on the tiny random model: real Spark (local[2]), real
TorchDistributor (2 barrier tasks, DDP over gloo), real peft, real MLflow (sqlite in tmp,
so the model registry works). One training run (module fixture) serves the tests of the
distributed loop, the merged checkpoint, the quarantine and the registration hand-off;
libinfer.tuning's data functions are checked on their own without a model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import JOB_ROOT, write_jsonl

GOOD = [{"id": f"g{i}", "prompt": f"Complete the search query.\nQ: cheap tea kett {i}\nA:",
         "completion": f" cheap tea kettles {i}"} for i in range(6)]
BAD = [  # (record, the start of the reason it must be quarantined with)
    ({"id": "m1", "completion": " x"}, "null text"),
    ({"id": "m2", "prompt": "hello"}, "null completion"),
    ({"id": "m3", "prompt": "hello", "completion": 5}, "completion is not a string: int"),
    ({"id": "m4", "prompt": 7, "completion": " x"}, "text is not a string: int"),
    ({"id": "m5", "prompt": "hi", "completion": "   "}, "empty completion"),
    ({"id": "m6", "prompt": "word " * 80, "completion": " x"}, "pair too long"),
    ({"id": "g0", "prompt": "again", "completion": " y"}, "duplicate id 'g0'"),
    ({"prompt": "no id", "completion": " z"}, "missing id"),
    (b"{not json", "invalid JSON"),
]


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(JOB_ROOT, "conf"), version_base=None):
        return hydra_compose("finetune", overrides=list(overrides))


@pytest.fixture(scope="module")
def finetuned(spark, tiny_model, job_env, tmp_path_factory):
    """One jobs.finetune run: 4 train / 2 held-out pairs, 2 processes x 2 examples = the same
    4 examples every step, a high constant learning rate, registration on."""
    from jobs import finetune
    root = tmp_path_factory.mktemp("finetune")
    data = write_jsonl(root / "pairs.jsonl", GOOD[:3] + [r for r, _ in BAD] + GOOD[3:])
    uri = job_env["mlflow_uri"]           # the session's store (a registry of its own name below)
    cfg = compose("model=tiny_random", "spark=local2", f"data.path={data}", f"out={root / 'out'}",
                  f"mlflow.tracking_uri={uri}", "finetune.num_processes=2", "finetune.batch_size=2",
                  "finetune.max_steps=8", "finetune.lr=1e-2", "finetune.lr_schedule=constant",
                  "finetune.warmup_steps=0", "finetune.eval_every=4", "finetune.log_every=2",
                  "finetune.eval_fraction=0.34", "finetune.max_seq_len=64", "finetune.register_model=tiny_ft",
                  "generation.out_seq_length=4")
    finetune.validate(cfg)
    res = finetune.run(cfg, spark)
    return {"res": res, "cfg": cfg, "uri": uri, "root": root, "data": data}


def test_two_processes_lower_the_loss(finetuned):
    import mlflow
    res = finetuned["res"]
    t = res["train"]
    assert t["world_size"] == 2 and t["global_batch"] == 4 and t["threads"] == 1
    losses = [s["train_loss"] for s in t["curves"]["train"]]
    assert len(losses) == 8
    # the same 4 examples every step: the loss must fall well below where it started
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [e["step"] for e in t["curves"]["eval"]]
    assert evals == [0, 4, 8]
    assert t["tokens_per_s"] > 0 and t["peak_rss_bytes"] > 0 and 0 < t["trainable_params"] < t["total_params"]
    client = mlflow.MlflowClient(tracking_uri=finetuned["uri"])
    run = client.get_run(res["run_id"])
    history = {m.step: m.value for m in client.get_metric_history(res["run_id"], "eval_loss")}
    assert sorted(history) == [0, 4, 8]
    assert history[0] == pytest.approx(t["curves"]["eval"][0]["eval_loss"])
    assert history[8] < history[0]
    assert len(client.get_metric_history(res["run_id"], "train_loss")) == 8
    m = run.data.metrics
    assert m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0 and m["rows_quarantined"] == len(BAD)
    assert run.data.tags["checkpoint.content_hash"] == res["checkpoint"]["content_hash"]
    assert run.data.params["finetune.method"] == "lora"
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"loss_curves.png", "checkpoint.json", "config.yaml", "compare.md"} <= arts


def test_merged_checkpoint_is_what_was_trained(finetuned):
    """DIR/checkpoint loads in libinfer as it is; its fp32 greedy tokens equal transformers'
    on it; its held-out loss equals the trained (unmerged) model's last eval_loss."""
    from libinfer import Checkpoint, Generator
    from libinfer.loading.export import transformers_model
    from libinfer.tuning import Example, evaluate
    from libinfer.tuning.train import _Ranks
    from tests.models.families import hf_greedy, ours_greedy
    res, cfg = finetuned["res"], finetuned["cfg"]
    ckpt = res["checkpoint"]["path"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(ckpt))
    assert Checkpoint.open(ckpt).content_hash() == res["checkpoint"]["content_hash"]
    gen = Generator.from_pretrained(ckpt, dtype="float32", warmup=False)
    prompts = [g["prompt"] for g in GOOD[:4]] + ["The capital of France is"]
    assert ours_greedy(gen, prompts, 12) == hf_greedy(ckpt, gen.tokenizer, prompts, 12)

    merged = transformers_model(ckpt)
    base = transformers_model(cfg.model.path)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    held = [json.loads(line) for line in open(res["eval_path"])]
    tok = gen.tokenizer
    examples = []
    for r in held:
        p = tok(r["prompt"]).input_ids
        examples.append(Example(r["id"], tuple(p + tok(r["completion"], add_special_tokens=False).input_ids
                                               + [tok.eos_token_id]), len(p)))
    loss, _ = evaluate(merged, examples, _Ranks("cpu"), 8, tok.eos_token_id)
    assert loss == pytest.approx(res["train"]["curves"]["eval"][-1]["eval_loss"], rel=1e-4)


def test_bad_rows_quarantined_every_row_once(finetuned):
    import pandas as pd
    out = finetuned["root"] / "out"
    q = pd.read_parquet(out / "quarantine")
    assert len(q) == len(BAD) and set(q.stage) == {"finetune"}
    for rec, reason in BAD:
        rid = rec.get("id") if isinstance(rec, dict) else None
        rows = q[q.id == rid] if rid else q[q.id.isna()]
        assert any(r.startswith(reason) for r in rows.reason), (rid, reason, list(rows.reason))
    assert all(isinstance(r, str) and r for r in q.raw)        # the input kept for every bad row
    ids = [json.loads(line)["id"] for f in ("train.jsonl", "eval.jsonl") for line in open(out / "splits" / f)]
    assert sorted(ids) == sorted(g["id"] for g in GOOD)        # every good row once, in one split
    assert len([json.loads(line) for line in open(out / "splits" / "eval.jsonl")]) == 2


def test_registration_hand_off(finetuned):
    """Base and fine-tuned registered, benchmarked and evaluated on the held-out split, as runs
    nested under the finetune run; the compare table holds both."""
    import mlflow
    reg = finetuned["res"]["registration"]
    assert (reg["base_version"], reg["version"]) == (1, 2)
    client = mlflow.MlflowClient(tracking_uri=finetuned["uri"])
    versions = {int(v.version): v for v in client.search_model_versions("name = 'tiny_ft'")}
    assert sorted(versions) == [1, 2]
    assert versions[2].tags["path"] == finetuned["res"]["checkpoint"]["path"]
    assert versions[2].tags["content_hash"] == finetuned["res"]["checkpoint"]["content_hash"]
    for v in versions.values():
        assert v.tags["register.status"] == "evaluated", v.tags.get("register.error")
        assert v.tags["eval.set"] == finetuned["res"]["eval_path"]
        assert float(v.tags["eval.reference_perplexity"]) > 1 and float(v.tags["bench.tokens_per_s"]) > 0
        assert "eval.exact_match" in v.tags and "eval.chrf" in v.tags and "eval.bleu" in v.tags
        assert client.get_run(v.run_id).data.tags["mlflow.parentRunId"] == finetuned["res"]["run_id"]
        assert client.get_run(v.run_id).data.metrics["rows"] == 2
    # training moved the fine-tuned model towards the held-out completions
    assert float(versions[2].tags["eval.reference_perplexity"]) < float(versions[1].tags["eval.reference_perplexity"])
    cmp = client.get_run(reg["compare_run_id"])
    assert cmp.data.tags["mlflow.parentRunId"] == finetuned["res"]["run_id"]
    assert "v1 (baseline)" in reg["markdown"] and "| v2 |" in reg["markdown"] and "exact match" in reg["markdown"]


def test_config_is_checked(tiny_model, tmp_path):
    from jobs import finetune
    from jobs._config import ConfigError
    data = write_jsonl(tmp_path / "p.jsonl", GOOD)
    ok = ("model=tiny_random", f"data.path={data}", "spark=local2", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db")
    for bad, key in [("finetune.method=qlora", "finetune.method"), ("finetune.lora.r=0", "finetune.lora.r"),
                     ("finetune.num_processes=3", "finetune.num_processes"),
                     ("mlflow.tracking_uri=./mlruns", "mlflow.tracking_uri"), ("data.format=text", "data.format"),
                     ("finetune.eval_fraction=0", "finetune.eval_fraction")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            finetune.validate(compose(*ok, bad))
    finetune.validate(compose(*ok, "finetune.eval_fraction=0", "finetune.register=false"))
    # a misspelled key fails at start, naming it; --help shows the finetune group
    env = dict(os.environ, HYDRA_RUN_ROOT=str(tmp_path / "hydra"))
    p = subprocess.run([sys.executable, "-m", "jobs.finetune", *ok, "finetune.max_step=3"], cwd=JOB_ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "max_step" in p.stderr
    h = subprocess.run([sys.executable, "-m", "jobs.finetune", "--help"], cwd=JOB_ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert h.returncode == 0 and "num_processes" in h.stdout and "completion_column" in h.stdout


# ----------------------------------------------------------- libinfer.tuning.data

def test_completion_only_labels_and_eos():
    from libinfer import Checkpoint
    from libinfer.tuning import collate, make_example
    from libinfer.tuning.data import IGNORE
    tok = Checkpoint.open(None).load_tokenizer()
    p = tok("Q: cheap yoga\nA:").input_ids
    ex, reason = make_example("a", p, " cheap yoga mats", tok, 64, tok.eos_token_id)
    assert reason is None and ex.n_prompt == len(p)
    assert list(ex.input_ids) == p + tok(" cheap yoga mats", add_special_tokens=False).input_ids + [tok.eos_token_id]
    short, _ = make_example("b", p[:3], " x", tok, 64, None)
    b = collate([ex, short], pad_id=0)
    assert b["input_ids"].shape == (2, len(ex.input_ids))
    assert (b["labels"][0, :len(p)] == IGNORE).all() and b["labels"][0, -1] == tok.eos_token_id
    assert b["labels"][1].tolist() == [IGNORE] * 3 + list(short.input_ids[3:]) + [IGNORE] * (b["labels"].shape[1] - 4)
    assert b["attention_mask"][1].sum() == len(short.input_ids)
    assert make_example("c", p, " " + "word " * 80, tok, 64, None)[1].startswith("pair too long")


def test_split_and_step_order_do_not_depend_on_arrival_or_processes():
    from libinfer.tuning import Example, split, step_indices
    exs = [Example(f"r{i}", (1, 2, 3), 1) for i in range(50)]
    train, held = split(exs, 0.2, seed=3)
    train2, held2 = split(list(reversed(exs)), 0.2, seed=3)
    assert len(held) == 10 and {e.id for e in held} == {e.id for e in held2}
    assert {e.id for e in train} | {e.id for e in held} == {e.id for e in exs}
    assert {e.id for e in split(exs, 0.2, seed=4)[1]} != {e.id for e in held}
    # a step's examples are one slice of an epoch stream: 7 steps of 16 cover epochs 0-2 in order
    steps = [step_indices(50, s, 16, seed=0) for s in range(7)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))
    assert step_indices(50, 3, 16, seed=0) == steps[3]


def test_accumulation_makes_the_same_update_as_a_larger_batch(tiny_model):
    """The step's loss is normalised by the whole step's completion tokens, so 2 micro-batches
    of 2 give the update of 1 batch of 4 (what lets 2 processes x 1 stand in for 1 x 2)."""
    from libinfer import Checkpoint
    from libinfer.tuning import TrainConfig, make_example, train
    tok = Checkpoint.open(tiny_model.path).load_tokenizer()
    exs = [make_example(g["id"], tok(g["prompt"]).input_ids, g["completion"] + " x" * i, tok, 64,
                        tok.eos_token_id)[0] for i, g in enumerate(GOOD)]      # unequal completion lengths
    base = {"max_steps": 2, "lr": 1e-2, "lr_schedule": "constant", "warmup_steps": 0, "eval_every": 0,
            "lora": {"dropout": 0.0}}
    a = train({"path": tiny_model.path}, exs[:4], exs[4:], TrainConfig.from_dict({**base, "batch_size": 2,
                                                                                  "grad_accum": 2}), None, 1)
    b = train({"path": tiny_model.path}, exs[:4], exs[4:], TrainConfig.from_dict({**base, "batch_size": 4}), None, 1)
    la, lb = a["curves"]["eval"][-1]["eval_loss"], b["curves"]["eval"][-1]["eval_loss"]
    assert la == pytest.approx(lb, rel=1e-5) and la < a["curves"]["eval"][0]["eval_loss"] - 0.1
    assert [s["train_loss"] for s in a["curves"]["train"]] == pytest.approx([s["train_loss"] for s in
                                                                             b["curves"]["train"]], rel=1e-5)
