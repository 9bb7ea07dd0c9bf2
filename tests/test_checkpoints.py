"""Checkpoint automation end to end in a real MLflow store (sqlite, so the model registry
works): jobs.register over the bundled GGUF, a safetensors export of it and a perturbed
copy, plus a truncated file; re-registering is a no-op; jobs.compare's table; and
jobs.evaluate's metrics on a tiny hand-checked example."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import JOB_ROOT, write_jsonl


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(JOB_ROOT, "conf"), version_base=None):
        return hydra_compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """watch/: the bundled GGUF, its bf16 safetensors export, a perturbed export, a truncated GGUF."""
    from libinfer import Checkpoint, bundled_model
    from libinfer.loading.export import hf_config, hf_state_dict, save_hf
    root = tmp_path_factory.mktemp("ckpts")
    watch = root / "watch"
    watch.mkdir()
    folder, gguf = bundled_model()
    src = os.path.join(folder, gguf)
    os.symlink(src, watch / "a_smollm2.gguf")
    ckpt = Checkpoint.open(src)
    tensors = hf_state_dict(ckpt, torch.bfloat16)
    tok, config = ckpt.load_tokenizer(), hf_config(ckpt)
    save_hf(watch / "b_smollm2_hf", tensors, config, tok)
    g = torch.Generator().manual_seed(0)
    for k in [k for k in tensors if ".mlp.down_proj" in k]:      # a "later checkpoint": every MLP output moved
        t = tensors[k].float()
        tensors[k] = (t + 0.2 * t.std() * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
    save_hf(watch / "c_smollm2_perturbed", tensors, config, tok)
    with open(src, "rb") as a, open(watch / "d_truncated.gguf", "wb") as b:
        b.write(a.read(os.path.getsize(src) // 2))
    return watch


def test_register_evaluate_compare(checkpoints, spark, job_env, tmp_path):
    import mlflow
    from jobs import register
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "a", "prompt": "Q: What is the capital of France?\nA:", "reference": "Paris"},
        {"id": "b", "prompt": "Q: What do bees make?\nA:", "reference": "Honey"}])
    cfg = compose("register", f"register.watch={checkpoints}", "register.once=true", "register.settle_s=0",
                  "register.model_name=smollm2", f"mlflow.tracking_uri={uri}", f"data.path={data}",
                  f"out={tmp_path / 'out'}", "generation.out_seq_length=4", "spark=local2",
                  "register.bench.prompt_tokens=16", "register.bench.out_tokens=4", "register.bench.batch_size=2")
    register.validate(cfg)
    results = register.run(cfg, spark=spark)
    by_name = {os.path.basename(r["path"]): r for r in results}
    assert [by_name[n]["status"] for n in sorted(by_name)] == ["registered", "registered", "registered", "failed"]
    assert "d_truncated.gguf" in by_name["d_truncated.gguf"]["path"]
    assert "cannot read GGUF" in by_name["d_truncated.gguf"]["error"]

    client = mlflow.MlflowClient(tracking_uri=uri)
    versions = {int(v.version): v for v in client.search_model_versions("name = 'smollm2'")}
    assert sorted(versions) == [1, 2, 3]
    fmt = {v: versions[v].tags["format"] for v in versions}
    assert fmt == {1: "gguf", 2: "safetensors", 3: "safetensors"}
    assert versions[1].tags["dtype"].startswith("Q4_1:210")
    assert versions[2].tags["dtype"] == "BF16:272"
    assert json.loads(versions[2].tags["config"])["n_layers"] == 30
    for v in versions.values():
        assert v.tags["register.status"] == "evaluated", v.tags.get("register.error")
        assert float(v.tags["eval.reference_perplexity"]) > 1.0
        assert float(v.tags["bench.tokens_per_s"]) > 0
        assert 0.0 <= float(v.tags["eval.chrf"]) <= 100.0
        run = client.get_run(v.run_id)
        assert run.data.metrics["rows"] == 2 and "generate.tokens_per_s" in run.data.metrics
        arts = {a.path for a in client.list_artifacts(v.run_id)} | \
               {a.path for a in client.list_artifacts(v.run_id, "checkpoint")}
        assert {"eval_outputs.json", "checkpoint/checkpoint.json", "checkpoint/config.json"} <= arts
    # the GGUF and its bf16 export are the same model: same greedy outputs on this set, close perplexity
    p1, p2, p3 = (float(versions[v].tags["eval.reference_perplexity"]) for v in (1, 2, 3))
    assert abs(p1 - p2) / p1 < 0.05 and abs(p3 - p1) / p1 > 0.01

    # the truncated file: one FAILED run with the reason, no version
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    failed = client.search_runs([exp.experiment_id], "tags.`register.status` = 'failed'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "cannot read GGUF" in failed[0].data.tags["register.error"]

    # compare: a run with the table normalised to v1, as Markdown and PNG
    cmp_runs = client.search_runs([exp.experiment_id], "tags.job = 'compare'")
    assert len(cmp_runs) == 1
    local = client.download_artifacts(cmp_runs[0].info.run_id, "", str(tmp_path / "cmp"))
    md = open(os.path.join(local, "compare.md")).read()
    assert "v1 (baseline)" in md and "(1.00x)" in md and "| v3 |" in md.replace(" (baseline)", "")
    assert os.path.getsize(os.path.join(local, "compare.png")) > 1000

    # again: same hashes -> nothing new (the broken file is not re-reported either)
    again = register.run(cfg, spark=spark)
    assert [r["status"] for r in again] == ["skipped"] * 4
    assert len(client.search_model_versions("name = 'smollm2'")) == 3
    assert len(client.search_runs([exp.experiment_id], "tags.job = 'register'")) == 4


def test_evaluate_metrics_hand_checked(spark, tiny_model, tmp_path):
    """Two rows on the tiny model: one reference is the model's own greedy output (exact
    match, chrF 100), the other shares no character with it (chrF 0)."""
    from libinfer import GenerationParams, Generator, quality
    from jobs.evaluate import run_evaluate
    gen = Generator.from_pretrained(tiny_model.path, warmup=False)
    prompts = ["hello world", "the quick brown fox"]
    params = GenerationParams(greedy=True, out_seq_length=6, stop_sequences=["\n"], repetition_penalty=1.0)
    own = gen.generate(prompts, params)
    text0 = own[0].outputs[0].text
    assert text0.strip()
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "x0", "prompt": prompts[0], "reference": text0},
        {"id": "x1", "prompt": prompts[1], "reference": "\u00a7\u00a7"}])   # no shared characters
    cfg = compose("evaluate", "model=tiny_random", f"model.path={tiny_model.path}", f"data.path={data}",
                  f"out={tmp_path / 'out'}", "generation.out_seq_length=6", "generation.repetition_penalty=1.0",
                  "mlflow.enabled=false")
    m, table = run_evaluate(spark, cfg)
    assert m["rows"] == 2 and m["rows_with_reference"] == 2
    assert m["exact_match"] == 0.5
    assert list(table["chrf"]) == [pytest.approx(100.0), 0.0]
    assert list(table["prediction"]) == [o.outputs[0].text for o in own]
    n = sum(len(o.outputs[0].token_ids) for o in own)
    assert m["avg_generated_tokens"] == pytest.approx(n / 2)
    assert m["stop_hit_rate"] == sum(o.outputs[0].finish_reason == "stop" for o in own) / 2
    # perplexity of the references = exp(mean NLL) of Generator.score over both rows
    from jobs.evaluate import scored_reference
    assert scored_reference("Paris", " ") == " Paris" and scored_reference(" Paris", " ") == " Paris"
    lps = [lp for o, ref in zip(own, [text0, "\u00a7\u00a7"]) for lp in gen.score(
        o.prompt_token_ids, gen.tokenizer(scored_reference(ref, " "), add_special_tokens=False).input_ids)]
    assert m["reference_perplexity"] == pytest.approx(quality.perplexity(lps), rel=1e-4)


def test_determinism_report_tiny(tiny_model):
    from libinfer.lab.determinism import determinism_report
    r = determinism_report(tiny_model.path, None, ["a b c", "hello", "x y z w"] * 3, batch_sizes=(1, 4),
                           tp_sizes=(1,), dtypes=("float32", "bfloat16"), out_seq_length=4)
    assert r["batch_1"] == 1.0 and 0.0 <= r["batch_4"] <= 1.0 and 0.0 <= r["dtype_bfloat16"] <= 1.0
    assert r["prompts"] == 9
