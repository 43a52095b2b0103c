"""The plain backend: what Hugging Face + peft compute, with nothing added. It is the reference every fast component
is checked against (selfcheck.py), and the path any architecture runs correctly on.

- Training loss: the model's own forward (every logit it post-processes: soft-capping, logit scaling, ...), then the
  summed cross-entropy over the supervised positions (labels -100 elsewhere) and their count. The trainer normalises
  by the accumulation window's token count, so the loss is the summed one here.
- Label scores: log P(label + EOS | prompt) for each label as the model computes it for the sequence
  [prompt | label]: one forward per label over the batch (left-padded prompts, the label's tokens after them,
  position ids that skip the padding, as `generate` does), logits kept for the label positions only
  (`logits_to_keep`, where the model takes it).
"""

from __future__ import annotations

import contextlib
import inspect
from functools import lru_cache
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F


# -- helpers every backend uses -----------------------------------------------------------------------------------
def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@lru_cache(maxsize=None)
def _accepts(forward: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


@lru_cache(maxsize=None)
def _cache_kwarg(forward: Callable) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns until 5.40)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def decoder_call(decoder: torch.nn.Module, **kwargs: Any):
    """Call a transformers decoder (the model without its head) with a `cache` under whichever name it takes."""
    cache = kwargs.pop("cache", None)
    if cache is not None:
        kwargs[_cache_kwarg(type(decoder).forward)] = cache
    return decoder(**kwargs)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (HF models no longer derive them from the mask themselves)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def row_chunks(rows: int, length: int, max_tokens: Optional[int]) -> list[slice]:
    """Row slices that split a micro-batch of `rows` x `length` padded tokens into chunks of at most `max_tokens`
    (a power of two rows each, so that few chunk shapes recur; one row at least). None: the whole batch."""
    if max_tokens is None or rows * length <= max_tokens:
        return [slice(0, rows)]
    per = 1
    while 2 * per < rows and 2 * per * length <= max_tokens:
        per *= 2
    return [slice(s, min(s + per, rows)) for s in range(0, rows, per)]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of [N, V] logits (any float dtype; computed in fp32) against [N] targets."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


# -- the backend ----------------------------------------------------------------------------------------------------
class PlainBackend:
    """The interface the LightningModule uses (a fast backend overrides what it speeds up):

    - `train_step(batch, backward, sync)`: a training micro-batch's summed token loss and supervised-token count,
      its gradients accumulated into `p.grad` by `backward(loss)` (the trainer's manual_backward) inside
      `sync(last)` (DDP's gradient sync only on the window's last backward);
    - `loss(batch)`: the same without gradients (validation);
    - `score(batch)`: [B, K] label scores of a prompt batch (batching.collate_prompts);
    - `labeling()`: a context entered around validation and predict (the fast backend's module forwards);
    - `weights_changed()`: called after every optimizer step and whenever weights are loaded or merged;
    - `train_collate`: the DataLoader's collate for training batches (a fast backend adds fixed-shape fields).
    """

    name = "plain"

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype, chunk_tokens: Optional[int] = None):
        self.model = model
        self.dtype = compute_dtype
        self.chunk_tokens = chunk_tokens  # micro-batches of more padded tokens run as row chunks (same step)
        self.enabled: dict[str, bool] = {}

    def describe(self) -> str:
        return "plain (Hugging Face + peft as they are)"

    # -- training --------------------------------------------------------------------------------------------------
    def train_collate(self, pad_id: int, rows: int) -> Callable:
        from ..batching import PlainCollate

        return PlainCollate(pad_id)

    def train_step(self, batch: dict[str, torch.Tensor], backward: Callable[[torch.Tensor], None],
                   sync: Callable[[bool], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        parts = row_chunks(*ids.shape, self.chunk_tokens)
        loss = n = 0
        for i, part in enumerate(parts):
            with sync(i == len(parts) - 1):
                part_loss, part_n = self.loss_sum(ids[part], mask[part], labels[part])
                backward(part_loss)
            loss, n = loss + part_loss.detach(), n + part_n
        return loss, n

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def loss_sum(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, supervised tokens) of right-padded rows; labels unshifted, -100 = not supervised."""
        target = labels[:, 1:]
        keep = target != -100
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return token_loss(logits[keep], target[keep]), keep.sum()

    # -- labeling -----------------------------------------------------------------------------------------------
    def labeling(self) -> ContextManager:
        return contextlib.nullcontext()

    def weights_changed(self) -> None:
        pass

    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        return score_labels_plain(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["label_ids"],
                                  batch["label_mask"])


def score_labels_plain(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, label_ids: torch.Tensor,
                       label_mask: torch.Tensor) -> torch.Tensor:
    """[B, K] summed log-probs of each label's tokens (label + EOS) after each left-padded prompt: one forward of
    the model per label over [prompts | that label's tokens]."""
    B, T = prompt_ids.shape
    K, L = label_ids.shape
    keep = {"logits_to_keep": L + 1} if _accepts(type(base_model(model)).forward, "logits_to_keep") else {}
    scores = []
    for k in range(K):
        ids = torch.cat([prompt_ids, label_ids[k].expand(B, L)], 1)
        mask = torch.cat([prompt_mask, label_mask[k].expand(B, L)], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **keep).logits
        logp = torch.log_softmax(logits[:, -(L + 1):-1].float(), -1)  # position T-1+j predicts label token j
        tok = logp.gather(-1, label_ids[k].expand(B, L)[..., None])[..., 0]
        scores.append((tok * label_mask[k]).sum(-1))
    return torch.stack(scores, 1)
