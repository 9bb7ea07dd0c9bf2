"""jobs.preprocess data.cluster_by=prefix|length|none: rows of one few-shot header (a prefix
family) land together, sorted by length inside, every row exactly once; the summary line
and MLflow carry the family count and the share of prompt tokens in shared prefixes."""
from __future__ import annotations

import uuid
from collections import Counter

import pandas as pd
import pytest

from conftest import family_corpus, job_cfg, mixed_corpus, write_jsonl
from jobs.preprocess import local_families

BLOCK = 16


def test_local_families_pick_the_task_header():
    # Hand-made prefix trie (each int is one node: a block-prefix). Six rows of task X and
    # five of task Y open with the same two blocks (1, 2); X's header ends at node 10, Y's at
    # 23; two X rows share one block more (their queries start alike): they stay with X.
    x = [[1, 2, *range(3, 11), 100 + i] for i in range(4)] + [[1, 2, *range(3, 11), 11, 200 + i] for i in range(2)]
    y = [[1, 2, 20, 21, 22, 23, 300 + i] for i in range(5)]
    odd = [[1, 400]]            # shares only the opening: a family of its own at node 1
    alone = [[500, 501], []]    # shares no block with anyone / shorter than one block
    fam = local_families(x + y + odd + alone)
    assert fam == [10] * 6 + [23] * 5 + [1] + [None, None]
    # The job's numpy pick (family_columns, per Arrow batch) agrees with the reference.
    import numpy as np
    from jobs.preprocess import family_columns
    rows = x + y + odd + alone
    boff = np.r_[0, np.cumsum([len(b) for b in rows])]
    flat = np.array([h for b in rows for h in b], dtype=np.int64)
    keys, counts = np.unique(flat, return_counts=True)
    has, family, root, shared, _ = family_columns(boff, flat, keys[counts >= 2], counts[counts >= 2])
    assert [int(f) if h else None for h, f in zip(has, family)] == fam
    assert [int(r) for r, h in zip(root, has) if h] == [1] * 12
    assert list(shared) == [10] * 4 + [11] * 2 + [6] * 5 + [1, 0, 0]


def read_partitions(out_dir: str, spark) -> list[pd.DataFrame]:
    from jobs._spark import Output
    out = Output(spark, out_dir)
    parts = [pd.read_parquet(f"{out_dir}/clustered/{f}") for f in out.data_files("clustered")]
    return [p for p in parts if len(p)]


def families_of(df: pd.DataFrame) -> list[str]:
    """The reference family of each row, from its token ids (the engine's block hashes), as
    text ("none": no family; pandas would turn 64-bit hashes and None into floats)."""
    from libinfer.engine.kv_cache import block_hashes
    return ["none" if f is None else str(f) for f in local_families([block_hashes(list(t)) for t in df["token_ids"]])]


def shared_stats(df: pd.DataFrame) -> tuple[int, int]:
    """(tokens in blocks that >= 2 rows share, counted per row; distinct shared blocks)."""
    from libinfer.engine.kv_cache import block_hashes
    blocks = [block_hashes(list(t)) for t in df["token_ids"]]
    c = Counter(h for b in blocks for h in b)
    return BLOCK * sum(1 for b in blocks for h in b if c[h] >= 2), sum(1 for n in c.values() if n >= 2)


def test_prefix_families_land_together_sorted_by_length(spark, run_cfg, tmp_path, capsys):
    from jobs._spark import Output
    from jobs._tracking import mlflow_run
    from jobs.preprocess import log_preprocess, run_preprocess
    rows = family_corpus(64)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    exp = f"prefix-{uuid.uuid4().hex[:8]}"
    # The first attempt of a tokenizing task fails: Spark's retry must not lose or repeat a row.
    cfg = run_cfg(f"data.path={path}", "data.num_partitions=4", "model.max_batch_size=8", f"mlflow.experiment={exp}",
                  "fault.stage=preprocess", "fault.fail_partition=1", "fault.attempts=1")
    assert cfg.data.cluster_by == "prefix"                  # the default
    with mlflow_run(cfg, "preprocess") as run:
        m = run_preprocess(spark, cfg, Output(spark, cfg.out))
        log_preprocess(m)
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"], m["cluster_by"]) == (64, 64, 0, "prefix")

    parts = read_partitions(cfg.out, spark)
    assert len(parts) >= 2
    whole = pd.concat(parts, ignore_index=True)
    assert sorted(whole["id"]) == sorted(r["id"] for r in rows)          # every row exactly once
    whole["family"] = families_of(whole)
    whole["part"] = [i for i, p in enumerate(parts) for _ in range(len(p))]
    task = {r["id"]: r["task"] for r in rows}
    whole["task"] = whole["id"].map(task)

    # One family per task (the two tasks behind one opening stay apart), none for "solo".
    fam_of_task = whole.groupby("task")["family"].agg(set)
    assert all(len(f) == 1 for f in fam_of_task), fam_of_task
    assert fam_of_task["solo"] == {"none"} and len({next(iter(f)) for f in fam_of_task}) == 4
    # A family's rows are contiguous in partition order (one partition or neighbouring ones),
    # the rows without a family come after every family.
    for fam, idx in whole.groupby("family").groups.items():
        assert idx.max() - idx.min() + 1 == len(idx), fam
        parts_of = sorted(set(whole.loc[idx, "part"]))
        assert parts_of == list(range(parts_of[0], parts_of[-1] + 1)), fam
    solo = whole.index[whole["task"] == "solo"]
    assert solo.min() > whole.index[whole["task"] != "solo"].max()
    # Sorted by length inside each family within each partition.
    for _, g in whole.groupby(["part", "family"]):
        assert list(g["n_tokens"]) == sorted(g["n_tokens"])

    # Family count and shared share: in the metrics, the summary line and MLflow.
    shared, nodes = shared_stats(whole)
    prompt_tokens = int(whole["n_tokens"].sum())
    assert m["prefix_families"] == 3 and m["prompt_tokens"] == prompt_tokens
    assert m["prefix_shared_tokens"] == shared and m["prefix_shared_share"] == pytest.approx(shared / prompt_tokens)
    assert m["prefix_reusable_tokens"] == shared - BLOCK * nodes
    assert 0.5 < m["prefix_shared_share"] < 1
    assert m["padding_waste"] == m["padding_waste_prefix"]
    printed = capsys.readouterr().out
    assert "cluster_by=prefix" in printed and "3 prefix families" in printed
    assert f"{100 * m['prefix_shared_share']:.1f}% of prompt tokens in shared prefixes" in printed

    import mlflow
    got = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(run.info.run_id)
    assert got.data.metrics["prefix_families"] == 3
    assert got.data.metrics["prefix_shared_share"] == pytest.approx(m["prefix_shared_share"])
    for k in ("prefix_shared_tokens", "prefix_reusable_tokens", "padding_waste_prefix", "padding_waste_sorted",
              "padding_waste_unsorted"):
        assert k in got.data.metrics, k
    assert got.data.params["data.cluster_by"] == "prefix"


def test_none_keeps_arrival_order_and_reports_families(spark, run_cfg, tmp_path):
    from jobs._spark import Output
    from jobs.preprocess import run_preprocess
    rows = family_corpus(40, seed=3)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = run_cfg(f"data.path={path}", "data.cluster_by=none", "data.num_partitions=2")
    m = run_preprocess(spark, cfg, Output(spark, cfg.out))
    whole = pd.concat(read_partitions(cfg.out, spark), ignore_index=True)
    assert list(whole["row"]) == sorted(whole["row"]) and sorted(whole["id"]) == sorted(r["id"] for r in rows)
    assert m["cluster_by"] == "none" and m["padding_waste"] == m["padding_waste_unsorted"]
    assert m["prefix_families"] == len(set(families_of(whole)) - {"none"}) > 1


def test_prefix_without_shared_prefixes_is_length_clustering(spark, run_cfg, tmp_path):
    from jobs._spark import Output
    from jobs.preprocess import run_preprocess
    path = write_jsonl(tmp_path / "in.jsonl", mixed_corpus(48))
    ids = {}
    for mode in ("prefix", "length"):
        cfg = run_cfg(f"data.path={path}", f"data.cluster_by={mode}", "data.num_partitions=3",
                      f"out={tmp_path / mode}")
        m = run_preprocess(spark, cfg, Output(spark, cfg.out))
        ids[mode] = [list(p["id"]) for p in read_partitions(cfg.out, spark)]
        assert m["prefix_families"] == 0 and m["prefix_shared_share"] == 0
    assert ids["prefix"] == ids["length"]


def test_cluster_by_config():
    from jobs._config import ConfigError, cluster_by
    assert cluster_by(job_cfg().data) == "prefix"
    assert cluster_by(job_cfg("data.cluster_by=length").data) == "length"
    # The deprecated switch still works: true = length, false = arrival order.
    assert cluster_by(job_cfg("data.sort_by_length=false").data) == "none"
    assert cluster_by(job_cfg("data.sort_by_length=true", "data.cluster_by=none").data) == "length"
    with pytest.raises(ConfigError, match="data.cluster_by"):
        job_cfg("data.cluster_by=family")
    assert job_cfg("model.prefix_cache=false").model.prefix_cache is False
