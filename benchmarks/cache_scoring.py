"""The previous label-scoring method, kept as a same-run baseline for benchmarks/gpu_throughput.py.

It ran the prompt with a KV cache, repeated that cache once per label (`batch_repeat_interleave(K)`) and ran
the label tokens on top at batch B x K. finllm_pl.scoring.score_labels now runs the prompt and a label tree in
one pass instead; both are exact (tests/test_scoring.py checks the new one against brute force).
"""

from __future__ import annotations

import torch

from finllm_pl.model import split_head
from finllm_pl.scoring import _decoder_call, _last_cache, _positions, common_prefix_length


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


def score_labels_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, label_ids: torch.Tensor,
                 label_mask: torch.Tensor, min_prefix: int = 8) -> torch.Tensor:
    """[B, K] summed log-probs of each label sequence (label tokens + EOS) after each (left-padded) prompt.

    min_prefix: run the prompts' common prefix once when it is at least this many tokens (and B > 1);
    0 turns prefix reuse off.
    """
    decoder, head, exact = split_head(model)
    if not exact:
        raise ValueError("model post-processes its logits: no baseline")
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


