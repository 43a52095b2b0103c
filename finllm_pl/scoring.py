"""Loss and label scoring on any HF causal LM (plain or PEFT), computing logits only where they are needed.

`loss_sum`: summed cross-entropy over supervised tokens only. The LM head runs on those positions alone: for a
one-word sentiment answer that is ~3 positions per row instead of every prompt token (the vocabulary of
DeepSeek-R1-Distill is 151,936 wide).

`score_labels`: log P(label + EOS | prompt) for every label, exactly, in one decoder pass: the prompt followed by
a "label tree" (every label's tokens but its last), under a 4D mask that lets each label token see the prompt
and the earlier tokens of its own label only. The cost is one prompt forward plus K x (label length - 1) tokens,
instead of K prompt forwards, with no KV cache copied per label; it is the same number a per-label full forward
gives (tests check that against `score_labels_reference`).

Shared-prefix reuse: every prompt of a labeling batch starts with the same tokens (chat template, system prompt,
instruction); only the input text differs. When that common prefix is at least `min_prefix` tokens long (and the
batch has more than one row), its KV cache (computed once per validate/predict run when the caller keeps a
`prefix_memo`) is given to every row and only the rest runs: a row's own copy of the prefix and its left padding
are masked out and the position ids continue from the prefix, so every row sees exactly its own prompt.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .model import split_head


@lru_cache(maxsize=None)
def _cache_kwarg(forward) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns until 5.40).
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _decoder_call(decoder, **kwargs):
    cache = kwargs.pop("cache", None)
    if cache is not None:
        kwargs[_cache_kwarg(type(decoder).forward)] = cache
    return decoder(**kwargs)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (HF models no longer derive them from the mask themselves)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """(sum of token losses, number of supervised tokens). Labels are unshifted (HF convention); -100 = ignore."""
    decoder, head, exact = split_head(model)
    target = labels[:, 1:]
    keep = target != -100
    n = keep.sum()
    if not exact:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
    else:
        hidden = _decoder_call(decoder, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = head(hidden.last_hidden_state[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), n


def _last_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def common_prefix_length(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """Tokens that every (left-padded) prompt of the batch starts with, capped so that each prompt keeps at
    least one token of its own after them (its last hidden state predicts the first label token)."""
    B, T = prompt_ids.shape
    n = prompt_mask.sum(-1)  # [B] real tokens per row
    col = torch.arange(T, device=prompt_ids.device)
    valid = col[None] < n[:, None]  # column j of `aligned` holds row b's j-th real token
    aligned = prompt_ids.gather(1, ((T - n)[:, None] + col[None]).clamp(max=T - 1))
    same = ((aligned == aligned[:1]) & valid).all(0)
    shared = same.long().cumprod(0).sum()
    return int(torch.minimum(shared, n.min() - 1).clamp(min=0))  # one device sync


def _tree_mask(prompt_mask: torch.Tensor, label_mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [B, T+M, T+M] bool, positions [B, T+M]) for one pass over [left-padded prompt | label tree].

    The tree holds every label's tokens but its last (M = K x (L-1) columns, label k's j-th token at
    T + k(L-1) + j); a tree token sees its row's real prompt tokens and the earlier tokens of its own label only,
    so each label continues the prompt as if it were alone. With a shared prefix of P tokens (P > 0), key
    columns 0..P are the prefix cache (seen by everyone) and a row's own copy of those tokens is hidden.
    Padding queries see themselves, so their (unused) hidden states stay finite: a NaN there would reach real
    rows through 0 x NaN in the attention product.
    """
    B, T = prompt_mask.shape
    K, L = label_mask.shape
    dev = prompt_mask.device
    n = prompt_mask.sum(-1)  # real prompt tokens per row
    col = torch.arange(T, device=dev)
    first = T - n + P  # first column of the row's own tokens after the shared prefix
    key_real = (col[None] < P) | (col[None] >= first[:, None]) if P else prompt_mask.bool()  # [B, T]
    branch = torch.arange(K, device=dev).repeat_interleave(L - 1)
    depth = torch.arange(L - 1, device=dev).repeat(K)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    top = (causal[None] & key_real[:, None]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
    tree = (branch[:, None] == branch[None]) & (depth[None] <= depth[:, None])  # [M, M]: same label, not later
    M = K * (L - 1)
    visible = torch.cat([torch.cat([top, top.new_zeros(B, T, M)], 2),
                         torch.cat([key_real[:, None].expand(B, M, T), tree[None].expand(B, M, M)], 2)], 1)
    positions = torch.cat([_positions(prompt_mask), n[:, None] + depth[None]], 1)
    return visible, positions


def mask_dtype(head) -> torch.dtype:
    """The float type of an additive (eager attention) mask: the compute dtype the head's weight shows."""
    return head.weight.dtype if head.weight.is_floating_point() else torch.float32


def attention_mask_4d(visible: torch.Tensor, decoder, dtype: torch.dtype) -> torch.Tensor:
    """A custom 4D mask as the attention implementation takes it (HF passes 4D masks through unchanged)."""
    impl = getattr(decoder.config, "_attn_implementation", "sdpa")
    if impl == "eager":  # additive float mask
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)[:, None]
    return visible[:, None]


def prefix_cache(decoder, prefix: torch.Tensor, B: int, dtype: torch.dtype, memo: Optional[dict] = None,
                 key: Optional[tuple[int, ...]] = None):
    """A KV cache holding `prefix` ([1, P]) for B rows (differentiable; training packs the prefix instead:
    graphs.packed_prefix_hidden, tested equal to this).
    Labeling passes `memo`: the prefix's keys/values are computed once per distinct prefix and kept for the next
    batches (the same instruction prefix heads every batch of a job; at batch 1 its forward is all kernel
    launches and no work), looked up by `key`, the prefix's ids on the host (else read from the device: a sync).
    `dtype`: of an additive mask (eager attention)."""
    if memo is not None and key is None:
        key = tuple(prefix[0].tolist())
    kv = memo.get(key) if memo is not None else None
    if kv is None:
        # An explicit causal 4D mask: HF's own mask code would look at the (all-ones) padding mask on the host,
        # a device sync.
        P = prefix.shape[1]
        causal = torch.ones(P, P, dtype=torch.bool, device=prefix.device).tril()[None]
        out = _decoder_call(decoder, input_ids=prefix, attention_mask=attention_mask_4d(causal, decoder, dtype),
                            position_ids=torch.arange(P, device=prefix.device)[None], use_cache=True)
        kv = [(layer.keys, layer.values) for layer in _last_cache(out).layers]
        if memo is not None:
            if len(memo) >= 8:  # a job has one or a few instructions; never grow without bound
                memo.clear()
            memo[key] = kv
    return DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv],
                        config=decoder.config)


def score_labels(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, label_ids: torch.Tensor,
                 label_mask: torch.Tensor, min_prefix: int = 8, prefix_memo: Optional[dict] = None,
                 prefix: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[B, K] summed log-probs of each label sequence (label tokens + EOS) after each (left-padded) prompt.

    One decoder pass over [prompt | label tree] (see `_tree_mask`): no KV cache is repeated per label, and the
    LM head runs only at the last prompt token and the tree tokens.
    min_prefix: run the prompts' common prefix once (at batch 1, its KV cache shared by all rows) when it is at
    least this many tokens and B > 1; 0 turns prefix reuse off.
    prefix_memo: a dict that keeps prefix caches between calls. Only while the weights do not change (one
    validation or predict run): the caller empties it.
    prefix: the prompts' common prefix as the host knows it (data.collate_prompts: `prefix_ids`), so that
    nothing is read back from the GPU; None finds it on the device (a sync per batch).
    """
    decoder, head, exact = split_head(model)
    impl = getattr(decoder.config, "_attn_implementation", "sdpa")
    if not exact or impl not in ("sdpa", "eager"):  # custom 4D masks: sdpa and eager only
        if exact:
            warnings.warn(f"label scoring with attn_implementation={impl!r} falls back to one full forward per row "
                          "and label (slow); model.attn_implementation sdpa scores in one pass", stacklevel=2)
        return score_labels_reference(model, prompt_ids, prompt_mask, label_ids, label_mask)
    B, T = prompt_ids.shape
    K, L = label_ids.shape
    if min_prefix > 0 and B > 1:
        P = len(prefix) if prefix is not None else common_prefix_length(prompt_ids, prompt_mask)
    else:
        P = 0
    P = P if P >= max(min_prefix, 1) else 0
    visible, positions = _tree_mask(prompt_mask, label_mask, P)
    dtype = mask_dtype(head)
    ids = torch.cat([prompt_ids, label_ids[:, :-1].reshape(1, -1).expand(B, -1)], 1)
    if P:  # the prefix's cache (computed once, or remembered) for every row; then everything after it
        n = prompt_mask.sum(-1)
        pre = prompt_ids[:1].gather(1, (T - n[:1, None]) + torch.arange(P, device=ids.device)[None])
        key = tuple(prefix) if prefix is not None else None
        kwargs = {"cache": prefix_cache(decoder, pre, B, dtype, prefix_memo, key), "use_cache": True}
    else:
        kwargs = {"use_cache": False}
    hidden = _decoder_call(decoder, input_ids=ids[:, P:], position_ids=positions[:, P:],
                           attention_mask=attention_mask_4d(visible[:, P:], decoder, dtype), **kwargs).last_hidden_state
    at = hidden[:, T - P - 1:]  # [B, 1 + M, H]: the last prompt token, then the tree
    # 2D into the head: a strided 3D slice makes torch pick a batched matmul that is ~30x slower on CPU
    logp = torch.log_softmax(head(at.reshape(-1, at.shape[-1])).float(), -1).view(B, at.shape[1], -1)  # [B, 1+M, V]
    scores = logp[:, 0, label_ids[:, 0]]  # [B, K]: first label token after the prompt
    if L > 1:
        tree = logp[:, 1:].view(B, K, L - 1, -1)  # token j of label k predicts its token j+1
        tok = tree.gather(-1, label_ids[:, 1:][None, :, :, None].expand(B, K, L - 1, 1))[..., 0]
        scores = scores + (tok * label_mask[:, 1:]).sum(-1)
    return scores


@torch.no_grad()
def score_labels_reference(model, prompt_ids, prompt_mask, label_ids, label_mask) -> torch.Tensor:
    """Brute force: one full forward per (row, label) with no padding at all; the definition of the score."""
    rows = []
    for b in range(prompt_ids.shape[0]):
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        row = []
        for k in range(label_ids.shape[0]):
            lab = label_ids[k][label_mask[k].bool()]
            seq = torch.cat([prompt, lab])
            logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
            pos = torch.arange(len(prompt) - 1, len(seq) - 1, device=seq.device)
            row.append(logp[pos, lab].sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)
