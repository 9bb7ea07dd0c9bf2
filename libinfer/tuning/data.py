"""Training examples from (prompt, completion) pairs: token ids with the loss on the
completion only, the held-out split, the order examples are drawn in, and padded batches.

The prompt arrives as token ids, tokenized exactly as generation will see it (jobs.finetune
uses jobs.preprocess's cleaning, template and tokenizer call), so the model learns to
continue the very ids it is later prompted with; the completion is tokenized on its own
and followed by EOS, so the model learns where to stop.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

IGNORE = -100      # label of a position without loss (prompt, padding): torch's cross_entropy default


@dataclass(frozen=True)
class Example:
    id: str
    input_ids: tuple[int, ...]      # prompt + completion (+ EOS)
    n_prompt: int                   # the first n_prompt positions carry no loss

    @property
    def n_completion(self) -> int:
        return len(self.input_ids) - self.n_prompt


def make_example(id: str, prompt_ids, completion, tokenizer, max_tokens: int,
                 eos_id: int | None) -> tuple[Example | None, str | None]:
    """(example, None), or (None, the reason the pair cannot be trained on)."""
    if completion is None:
        return None, "null completion"
    if not isinstance(completion, str):
        return None, f"completion is not a string: {type(completion).__name__}"
    if not completion.strip():
        return None, "empty completion"
    ids = tokenizer(completion, add_special_tokens=False).input_ids + ([eos_id] if eos_id is not None else [])
    n = len(prompt_ids) + len(ids)
    if n > max_tokens:
        return None, f"pair too long: {n} tokens (prompt {len(prompt_ids)} + completion {len(ids)}) > {max_tokens}"
    return Example(str(id), tuple(int(t) for t in prompt_ids) + tuple(ids), len(prompt_ids)), None


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): the round(n * eval_fraction) examples with the smallest seeded hash
    of their id, so the split does not depend on the order rows arrive in (Spark partitions)."""
    def key(e: Example) -> str:
        return hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest()
    ranked = sorted(examples, key=key)
    n_eval = round(len(examples) * eval_fraction)
    if eval_fraction > 0 and len(examples) >= 2:
        n_eval = min(max(n_eval, 1), len(examples) - 1)
    held = {e.id for e in ranked[:n_eval]}
    return [e for e in examples if e.id not in held], [e for e in examples if e.id in held]


def step_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The examples of optimizer step `step` (0-based): consecutive slices of a stream of
    seeded permutations, one per epoch. Every rank computes the same list and takes its own
    part, so the examples of a step do not depend on how many processes share it."""
    out: list[int] = []
    start = step * global_batch
    epoch, pos = divmod(start, n)
    while len(out) < global_batch:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out += perm[pos:pos + global_batch - len(out)]
        epoch, pos = epoch + 1, 0
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (IGNORE on prompt and padding), right-padded
    to the longest example."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
