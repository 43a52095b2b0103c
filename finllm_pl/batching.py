"""Batches as the models take them (no Lightning, no data files): padding, the training collate, label scoring's
prompt batches with the prefix they share, and token-budget batching of length-sorted rows. Used by the DataModule
(data.py), predict's stream (predict.py) and the execution backends (backend/)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch


def budget_batches(order: Sequence[int], lengths: Sequence[int], max_rows: int,
                   max_tokens: Optional[int] = None) -> list[list[int]]:
    """Cut `order` (rows sorted by length) into consecutive batches of at most `max_rows` rows and, when
    `max_tokens` is set, at most that many padded tokens (rows x the batch's longest row; a longer row alone
    still makes a batch). A token budget keeps every batch about as large for the GPU: many short rows or few
    long ones, instead of a fixed row count whose last batches pad everything to the longest rows."""
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(longest, lengths[i])
        if cur and (len(cur) >= max_rows or (max_tokens is not None and (len(cur) + 1) * n > max_tokens)):
            batches.append(cur)
            cur, n = [], lengths[i]
        cur.append(i)
        longest = n
    if cur:
        batches.append(cur)
    return batches


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs])


def collate_train(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels are -100 on the prompt (already) and on padding (here), nowhere else."""
    ids = [r["input_ids"] for r in rows]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad([r["labels"] for r in rows], -100),
    }


class PlainCollate:
    """collate_train as a picklable callable (DataLoader workers started by spawn get a copy)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_train(rows, self.pad_id)


def shared_prefix_ids(prompts: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The tokens every prompt starts with, leaving each prompt at least one of its own (its last hidden state
    predicts the first label token): scoring.common_prefix_length's answer, known on the host."""
    return tuple(os.path.commonprefix([list(p) for p in prompts])[:min(len(p) for p in prompts) - 1])


def collate_prompts(prompts: list[list[int]], pad_id: int, label_ids: list[list[int]]) -> dict[str, Any]:
    """Left-padded prompts (so every row's last prompt token sits in the last column) + the label sequences,
    and the prompts' shared prefix (label scoring runs it once)."""
    return {
        "prompt_ids": pad(prompts, pad_id, left=True),
        "prompt_mask": pad([[1] * len(p) for p in prompts], 0, left=True),
        "label_ids": pad(label_ids, pad_id),
        "label_mask": pad([[1] * len(s) for s in label_ids], 0),
        "prefix_ids": shared_prefix_ids(prompts),
    }


def collate_eval(rows: list[dict], pad_id: int, label_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    batch = collate_train(rows, pad_id)
    batch.update(collate_prompts([r["input_ids"][: r["prompt_len"]] for r in rows], pad_id, label_ids))
    # Rows repeated only to even out the ranks' batch counts (counted=False) count in neither loss nor metrics.
    dup = [j for j, r in enumerate(rows) if not r.get("counted", True)]
    batch["gold"] = torch.tensor([-1 if j in dup else r["gold"] for j, r in enumerate(rows)])
    batch["labels"][dup] = -100
    return batch
