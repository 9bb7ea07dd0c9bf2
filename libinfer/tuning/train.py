"""The fine-tuning loop: a transformers model of our checkpoint, LoRA (peft) or all
weights, data-parallel over the processes torchrun started (gloo on CPU, NCCL on CUDA),
evaluated on the held-out examples before training and every `eval_every` steps, merged
and saved as an HF directory that `Generator.from_pretrained` loads.

`train` is what each process runs (jobs.finetune hands it to Spark's TorchDistributor); it
also runs alone, in this process, when no torchrun environment is set. The loop knows
ranks only in three places: its share of each step's examples, DDP's gradient all-reduce,
and the all-reduced sums of the logged losses.

The loss of a step is the mean over the completion tokens of all its examples, whatever
the number of processes and micro-batches: every rank knows the whole step's examples
(`data.step_indices`), so it scales its token sum by world size / the step's token count
before DDP averages. 1 process with grad_accum=2 and 2 processes with grad_accum=1 make
the same updates.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, collate, step_indices

METHODS = ("lora", "full")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TuneConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class LoraConf:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class TrainConfig:
    method: str = "lora"                # lora (peft adapters, merged at the end) | full (every weight)
    lora: LoraConf = field(default_factory=LoraConf)
    max_steps: int = 200                # optimizer steps
    batch_size: int = 8                 # examples per process per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 2e-4                    # LoRA: 1e-4..1e-3; full: 1e-5..5e-5
    lr_schedule: str = "cosine"         # linear | cosine | constant | constant_with_warmup
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0          # 0 = no clipping
    eval_every: int = 50                # held-out loss every N steps (also at step 0 and the last); 0 = first/last only
    eval_batch_size: int = 16
    log_every: int = 10                 # a progress line every N steps
    seed: int = 0
    save_dtype: str = "float32"         # of the merged checkpoint

    def check(self) -> "TrainConfig":
        def need(key, ok, msg):
            if not ok:
                raise TuneConfigError(key, msg)
        need("method", self.method in METHODS, f"must be one of {', '.join(METHODS)} (got {self.method!r})")
        need("lr_schedule", self.lr_schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)} "
             f"(got {self.lr_schedule!r})")
        need("save_dtype", self.save_dtype in SAVE_DTYPES, f"must be one of {', '.join(SAVE_DTYPES)} "
             f"(got {self.save_dtype!r})")
        for k in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            need(k, getattr(self, k) >= 1, f"must be >= 1 (got {getattr(self, k)})")
        for k in ("warmup_steps", "eval_every"):
            need(k, getattr(self, k) >= 0, f"must be >= 0 (got {getattr(self, k)})")
        need("lr", self.lr > 0, f"must be > 0 (got {self.lr})")
        need("max_grad_norm", self.max_grad_norm >= 0, f"must be >= 0 (got {self.max_grad_norm})")
        if self.method == "lora":
            need("lora.r", self.lora.r >= 1, f"must be >= 1 (got {self.lora.r})")
            need("lora.dropout", 0 <= self.lora.dropout < 1, f"must be in [0, 1) (got {self.lora.dropout})")
            need("lora.target_modules", len(self.lora.target_modules) > 0, "must name at least one module")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        lora = LoraConf(**{**d.pop("lora", {})})
        lora.target_modules = list(lora.target_modules)
        return cls(lora=lora, **d).check()


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] finetune: {msg}", flush=True)


def token_nll(module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood, count) over the labelled (completion) tokens."""
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, (labels != IGNORE).sum()


class _Ranks:
    """This process's place in the torchrun group (rank 0 of 1 without one)."""

    def __init__(self, device: str):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = device.startswith("cuda")
        self.device = torch.device(f"cuda:{local}" if cuda and ":" not in device else device)
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist
            dist.init_process_group("nccl" if cuda else "gloo")

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def share(self, obj):
        """Rank 0's `obj` on every rank (each then returns the same result)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()


def build_model(model: dict, config: TrainConfig):
    """(the module to train, its trainable parameters) from our checkpoint."""
    from ..loading.export import transformers_model
    hf = transformers_model(model.get("path"), model.get("gguf_file"), torch.float32)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model
        lc = config.lora
        hf = get_peft_model(hf, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none",
                                           target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    else:
        for p in hf.parameters():
            p.requires_grad_(True)
    return hf, [p for p in hf.parameters() if p.requires_grad]


def evaluate(module, examples: list[Example], ranks: _Ranks, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(mean NLL per completion token, tokens) over the held-out examples, shared by rank."""
    was_training = module.training
    module.eval()
    nll = n = 0.0
    mine = examples[ranks.rank::ranks.world]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(ranks.device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
            s, c = token_nll(module, batch)
            nll, n = nll + float(s), n + float(c)
    module.train(was_training)
    nll, n = ranks.sum(nll, n)
    return (nll / n if n else float("nan")), int(n)


def save_merged(module, config: TrainConfig, tokenizer, out_dir: str) -> str:
    """LoRA merged into the weights, saved as one model.safetensors + config.json +
    tokenizer files; written beside and renamed, so a crash leaves no half checkpoint."""
    merged = module.merge_and_unload() if config.method == "lora" else module
    merged = merged.to(device="cpu", dtype=getattr(torch, config.save_dtype))
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def train(model: dict, train_set: list[Example], held_out: list[Example], config: TrainConfig,
          out_dir: str | None, threads: int = 0, device: str = "cpu") -> dict:
    """Fine-tune; returns the curves and measurements (the same dict on every rank) and,
    when `out_dir` is given, writes the merged HF checkpoint there (rank 0)."""
    from transformers import get_scheduler
    from ..loading import Checkpoint
    if threads:
        torch.set_num_threads(threads)
    ranks = _Ranks(device)
    lead = ranks.rank == 0
    torch.manual_seed(config.seed)        # the same LoRA init on every rank (DDP also broadcasts rank 0's)
    t_load = time.perf_counter()
    tokenizer = Checkpoint.open(model.get("path"), model.get("gguf_file")).load_tokenizer()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    module, params = build_model(model, config)
    module.to(ranks.device).train()
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(module, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    else:
        net = module
    load_s = time.perf_counter() - t_load
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in module.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = get_scheduler(config.lr_schedule, opt, num_warmup_steps=config.warmup_steps,
                          num_training_steps=config.max_steps)
    per_rank = config.batch_size * config.grad_accum
    global_batch = per_rank * ranks.world
    if lead:
        _say(f"{ranks.world} process(es) x {torch.get_num_threads()} thread(s) on {ranks.device}, "
             f"{config.method}: {n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M parameters trained; "
             f"{len(train_set)} train / {len(held_out)} held-out examples, {global_batch} per step "
             f"({config.batch_size} x {config.grad_accum} accumulation x {ranks.world}); loaded in {load_s:.1f}s")

    curves: dict[str, list] = {"train": [], "eval": []}

    def run_eval(step: int) -> None:
        loss, n = evaluate(module, held_out, ranks, config.eval_batch_size, pad_id)
        curves["eval"].append({"step": step, "eval_loss": loss, "eval_tokens": n})
        if lead:
            _say(f"step {step}/{config.max_steps} eval_loss {loss:.4f} ({n} held-out completion tokens)")

    if held_out:
        run_eval(0)
    tokens = completion_tokens = 0
    train_s = 0.0
    for step in range(1, config.max_steps + 1):
        t0 = time.perf_counter()
        exs = [train_set[i] for i in step_indices(len(train_set), step - 1, global_batch, config.seed)]
        n_global = sum(e.n_completion for e in exs)
        mine = exs[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]
        nll_sum, tok = 0.0, 0
        for k in range(config.grad_accum):
            batch = {key: v.to(ranks.device) for key, v in
                     collate(mine[k * config.batch_size:(k + 1) * config.batch_size], pad_id).items()}
            last = k == config.grad_accum - 1
            with (net.no_sync() if ranks.world > 1 and not last else contextlib.nullcontext()):
                nll, _ = token_nll(net, batch)
                (nll * ranks.world / n_global).backward()
            nll_sum += float(nll.detach())
            tok += int(batch["attention_mask"].sum())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        nll_all, tok_all = ranks.sum(nll_sum, tok)
        dt = time.perf_counter() - t0
        train_s += dt
        tokens += int(tok_all)
        completion_tokens += n_global
        curves["train"].append({"step": step, "train_loss": nll_all / n_global, "lr": lr, "step_s": dt,
                                "tokens": int(tok_all), "completion_tokens": n_global})
        if lead and (step % config.log_every == 0 or step == 1 or step == config.max_steps):
            _say(f"step {step}/{config.max_steps} train_loss {nll_all / n_global:.4f} lr {lr:.2e} {dt:.2f}s/step, "
                 f"{tok_all / dt:.0f} tokens/s ({n_global / dt:.0f} completion tokens/s)")
        if held_out and ((config.eval_every and step % config.eval_every == 0) or step == config.max_steps):
            run_eval(step)
    # the first step pays for allocation and kernel set-up (the talk: warm up before timing)
    warm = curves["train"][1:] or curves["train"]
    warm_s = sum(t["step_s"] for t in warm)
    peak_rss = ranks.max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak_cuda = ranks.max(torch.cuda.max_memory_allocated(ranks.device) if ranks.device.type == "cuda" else 0)
    result = {
        "curves": curves, "world_size": ranks.world, "threads": torch.get_num_threads(), "device": str(ranks.device),
        "train_tokens": tokens, "train_completion_tokens": completion_tokens, "train_s": train_s,
        "tokens_per_s": sum(t["tokens"] for t in warm) / warm_s, "tokens_per_s_with_first_step": tokens / train_s,
        "completion_tokens_per_s": sum(t["completion_tokens"] for t in warm) / warm_s,
        "load_s": load_s, "peak_rss_bytes": peak_rss, "peak_cuda_bytes": peak_cuda,
        "trainable_params": n_trainable, "total_params": n_total, "global_batch": global_batch,
        "config": asdict(config), "checkpoint": None, "save_s": 0.0,
    }
    if lead and out_dir:
        t0 = time.perf_counter()
        result["checkpoint"] = save_merged(module, config, tokenizer, out_dir)
        result["save_s"] = time.perf_counter() - t0
        _say(f"merged checkpoint written to {out_dir} in {result['save_s']:.1f}s")
    result = ranks.share(result)
    ranks.close()
    return result
