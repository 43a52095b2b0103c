"""Loss and label scoring on any HF causal LM (plain or PEFT), computing logits only where they are needed.

`loss_sum`: summed cross-entropy over supervised tokens only. The LM head runs on those positions alone: for a
one-word sentiment answer that is ~3 positions per row instead of every prompt token (the vocabulary of
DeepSeek-R1-Distill is 151,936 wide).

`score_labels`: log P(label + EOS | prompt) for every label, exactly, in one pass over the prompts. The prompt
runs once with a KV cache; the cache is repeated once per label and the (short) label sequences run on top of
it. The cost is one prompt forward plus K x (label length) tokens, instead of K prompt forwards, and it is the
same number a per-label full forward gives (tests check that against `score_labels_reference`).

Shared-prefix reuse: every prompt of a labeling batch starts with the same tokens (chat template, system prompt,
instruction); only the input text differs. When that common prefix is at least `min_prefix` tokens long (and the
batch has more than one row), the prefix runs once at batch 1, its KV cache is copied to every row, and only the
suffixes run on top of it: the gap between a row's prefix and its (left-padded) suffix is masked out and the
position ids continue from the prefix, so every row sees exactly its own prompt. The label continuation is then
the same as on the plain path.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F

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


def _prompt_pass(decoder, prompt_ids, prompt_mask, use_cache: bool):
    """Plain path: the whole padded prompt batch in one forward. (last hidden [B, H], cache, cache's mask)."""
    out = _decoder_call(decoder, input_ids=prompt_ids, attention_mask=prompt_mask,
                        position_ids=_positions(prompt_mask), use_cache=use_cache)
    return out.last_hidden_state[:, -1], (_last_cache(out) if use_cache else None), prompt_mask


def _prefix_pass(decoder, prompt_ids, prompt_mask, P: int):
    """Shared-prefix path: the first P real tokens (the same in every row) once at batch 1, then the suffixes.

    Cache layout per row: [prefix (P)] [row's left padding and its own copy of the prefix, masked] [suffix]; the
    suffix window is the last T - P columns of the left-padded batch, so no tensor is re-laid out.
    """
    B, T = prompt_ids.shape
    dev = prompt_ids.device
    n = prompt_mask.sum(-1)
    prefix = prompt_ids[:1].gather(1, (T - n[:1, None]) + torch.arange(P, device=dev)[None])  # row 0's first P
    out = _decoder_call(decoder, input_ids=prefix, attention_mask=prompt_mask.new_ones(1, P),
                        position_ids=torch.arange(P, device=dev)[None], use_cache=True)
    cache = _last_cache(out)
    cache.batch_repeat_interleave(B)
    col = torch.arange(P, T, device=dev)
    suffix_mask = (col[None] >= (T - n + P)[:, None]).to(prompt_mask.dtype)  # [B, T-P]: row b's own tokens
    pos = P + (suffix_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([prompt_mask.new_ones(B, P), suffix_mask], 1)
    out = _decoder_call(decoder, input_ids=prompt_ids[:, P:], attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True)
    return out.last_hidden_state[:, -1], _last_cache(out), mask


def score_labels(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, label_ids: torch.Tensor,
                 label_mask: torch.Tensor, min_prefix: int = 8) -> torch.Tensor:
    """[B, K] summed log-probs of each label sequence (label tokens + EOS) after each (left-padded) prompt.

    min_prefix: run the prompts' common prefix once when it is at least this many tokens (and B > 1);
    0 turns prefix reuse off.
    """
    decoder, head, exact = split_head(model)
    if not exact:
        return score_labels_reference(model, prompt_ids, prompt_mask, label_ids, label_mask)
    B, K, L = prompt_ids.shape[0], label_ids.shape[0], label_ids.shape[1]
    P = common_prefix_length(prompt_ids, prompt_mask) if min_prefix > 0 and B > 1 else 0
    if P >= max(min_prefix, 1):
        last, cache, ctx_mask = _prefix_pass(decoder, prompt_ids, prompt_mask, P)
    else:
        last, cache, ctx_mask = _prompt_pass(decoder, prompt_ids, prompt_mask, use_cache=L > 1)
    first = torch.log_softmax(head(last).float(), -1)  # [B, V]: P(token 0 | prompt)
    scores = first[:, label_ids[:, 0]]  # [B, K]
    if L > 1:
        cache.batch_repeat_interleave(K)  # row b's cache serves rows b*K .. b*K+K-1
        cont = label_ids[:, :-1].repeat(B, 1)  # [B*K, L-1]: feed tokens 0..L-2, predict 1..L-1
        cont_mask = label_mask[:, :-1].repeat(B, 1)
        mask = torch.cat([ctx_mask.repeat_interleave(K, 0), cont_mask.to(ctx_mask.dtype)], 1)
        start = prompt_mask.sum(-1).repeat_interleave(K)[:, None]  # real prompt tokens = next position
        pos = start + torch.arange(L - 1, device=start.device)[None]
        hidden = _decoder_call(decoder, input_ids=cont, attention_mask=mask, position_ids=pos, cache=cache,
                               use_cache=True).last_hidden_state
        logp = torch.log_softmax(head(hidden).float(), -1)  # [B*K, L-1, V]
        target = label_ids[:, 1:].repeat(B, 1)
        tok = logp.gather(-1, target[..., None])[..., 0] * label_mask[:, 1:].repeat(B, 1)
        scores = scores + tok.sum(-1).view(B, K)
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
