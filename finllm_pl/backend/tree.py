"""Loss and label scoring that compute logits only where they are needed (fast components `sparse_head`,
`label_tree`, `prefix_reuse`; plain torch + transformers).

sparse_head: the decoder runs alone and the LM head only at the positions that need logits: the supervised
positions of a training row (~3 per row for a one-word answer, instead of every prompt token: DeepSeek-R1-Distill's
vocabulary is 151,936 wide), the label positions when scoring. What the model does to its logits after the head
(Gemma's soft-capping, Granite's logits_scaling, Cohere's logit_scale) is applied as the model applies it.

label_tree: log P(label + EOS | prompt) for every label in one decoder pass over the prompt followed by a "label
tree" (every label's tokens but its last), under a 4D mask that lets each label token see the prompt and the earlier
tokens of its own label only: one prompt forward plus K x (label length - 1) tokens instead of K prompt forwards.

prefix_reuse: every prompt of a labeling batch starts with the same tokens (chat template, instruction). Their KV
cache is computed once (and kept for the next batches of a run, in `memo`) and given to every row; a row's own copy
of the prefix and its left padding are masked out and positions continue after the prefix.

Sliding windows: a layer that attends within a window sees a key only if their positions are less than the window
apart (transformers' rule); the hand-built masks apply it, per layer type when a model mixes full and windowed layers
(a dict of masks, which such models take). Whether all of this equals the plain path is checked for the run's
architecture by selfcheck.py, which switches off what does not.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from transformers import DynamicCache

from .plain import base_model, decoder_call, positions, token_loss

Mask = Union[torch.Tensor, dict[str, torch.Tensor]]


# -- the head ---------------------------------------------------------------------------------------------------
class Head:
    """(decoder, lm_head) of a causal LM, and the head's logits with the model's own post-processing."""

    def __init__(self, model: torch.nn.Module) -> None:
        base = base_model(model)
        self.config = base.config
        self.decoder, self.lm_head = base.get_decoder(), base.get_output_embeddings()
        cfg = self.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.divide = getattr(cfg, "logits_scaling", None)  # Granite
        self.multiply = getattr(cfg, "logit_scale", None) if getattr(cfg, "model_type", "") == "cohere" else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.divide not in (None, 1, 1.0):
            logits = logits / self.divide
        if self.multiply not in (None, 1, 1.0):
            logits = logits * self.multiply
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def mask_dtype(self) -> torch.dtype:
        """The float type of an additive (eager attention) mask: the compute dtype the head's weight shows."""
        w = self.lm_head.weight
        return w.dtype if w.is_floating_point() else torch.float32


def sparse_loss_sum(head: Head, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """(summed token loss, supervised tokens) with the head run on the supervised positions only."""
    target = labels[:, 1:]
    keep = target != -100
    hidden = decoder_call(head.decoder, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return token_loss(head(hidden.last_hidden_state[:, :-1][keep]), target[keep]), keep.sum()


# -- masks --------------------------------------------------------------------------------------------------------
def windows(config) -> dict[str, Optional[int]]:
    """{layer type: window or None} of the model's layers (one entry when they are all alike)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        return {t: (window if t == "sliding_attention" else None) for t in set(types)}
    use = getattr(config, "use_sliding_window", True)  # (Qwen2's switch)
    return {"all": window if window and use else None}


def layer_masks(visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, config, decoder,
                dtype: torch.dtype) -> Mask:
    """`visible` [B, Tq, Tk] (True = may attend) as the model's attention layers take it: 4D, additive for eager
    attention, with each windowed layer type's window applied by position (q - k < window); a dict by layer type
    when the model mixes window sizes."""
    by_type = {}
    for kind, window in windows(config).items():
        v = visible
        if window:
            v = visible & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
        by_type[kind] = _as_4d(v, decoder, dtype)
    return next(iter(by_type.values())) if len(by_type) == 1 else by_type


def _as_4d(visible: torch.Tensor, decoder, dtype: torch.dtype) -> torch.Tensor:
    if getattr(decoder.config, "_attn_implementation", "sdpa") == "eager":  # additive float mask
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)[:, None]
    return visible[:, None]


# -- label scoring ------------------------------------------------------------------------------------------------
def common_prefix_length(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """Tokens that every (left-padded) prompt of the batch starts with, capped so that each prompt keeps at
    least one token of its own after them (its last hidden state predicts the first label token)."""
    B, T = prompt_ids.shape
    n = prompt_mask.sum(-1)
    col = torch.arange(T, device=prompt_ids.device)
    valid = col[None] < n[:, None]  # column j of `aligned` holds row b's j-th real token
    aligned = prompt_ids.gather(1, ((T - n)[:, None] + col[None]).clamp(max=T - 1))
    same = ((aligned == aligned[:1]) & valid).all(0)
    shared = same.long().cumprod(0).sum()
    return int(torch.minimum(shared, n.min() - 1).clamp(min=0))  # one device sync


def tree_mask(prompt_mask: torch.Tensor, label_mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    n = prompt_mask.sum(-1)
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
    pos = torch.cat([positions(prompt_mask), n[:, None] + depth[None]], 1)
    if P:  # the prefix's keys sit at positions 0..P-1 of every row (the padding before a row's copy is hidden)
        pos = torch.where(torch.arange(T + M, device=dev)[None] < P, torch.arange(T + M, device=dev)[None], pos)
    return visible, pos


def prefix_cache(head: Head, prefix: torch.Tensor, B: int, memo: Optional[dict] = None,
                 key: Optional[tuple[int, ...]] = None) -> DynamicCache:
    """A KV cache holding `prefix` ([1, P]) for B rows. Labeling passes `memo`: the prefix's keys/values are
    computed once per distinct prefix and kept for the next batches, looked up by `key`, the prefix's ids on the host
    (else read from the device: a sync). The cache keeps every key: a windowed layer's window is in the mask."""
    if memo is not None and key is None:
        key = tuple(prefix[0].tolist())
    kv = memo.get(key) if memo is not None else None
    if kv is None:
        P = prefix.shape[1]
        pos = torch.arange(P, device=prefix.device)[None]
        causal = torch.ones(P, P, dtype=torch.bool, device=prefix.device).tril()[None]
        mask = layer_masks(causal, pos, pos, head.config, head.decoder, head.mask_dtype)
        out = decoder_call(head.decoder, input_ids=prefix, attention_mask=mask, position_ids=pos, use_cache=True,
                           cache=DynamicCache())
        cache = getattr(out, "cache", None) or out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if memo is not None:
            if len(memo) >= 8:  # a job has one or a few instructions; never grow without bound
                memo.clear()
            memo[key] = kv
    return DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv])


def score_labels_tree(head: Head, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, label_ids: torch.Tensor,
                      label_mask: torch.Tensor, min_prefix: int = 8, prefix_memo: Optional[dict] = None,
                      prefix: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[B, K] summed log-probs of each label sequence (label tokens + EOS) after each (left-padded) prompt, in one
    decoder pass over [prompt | label tree]; the head runs at the last prompt token and the tree tokens only.
    min_prefix: run the prompts' common prefix once when it is at least this long and B > 1 (0: never).
    prefix_memo: keeps prefix caches between calls while the weights do not change (the caller empties it).
    prefix: the prompts' common prefix as the host knows it (batching.collate_prompts' `prefix_ids`), so that nothing is
    read back from the GPU; None finds it on the device (a sync per batch)."""
    B, T = prompt_ids.shape
    K, L = label_ids.shape
    P = 0
    if min_prefix > 0 and B > 1:
        P = len(prefix) if prefix is not None else common_prefix_length(prompt_ids, prompt_mask)
        P = P if P >= min_prefix else 0
    visible, pos = tree_mask(prompt_mask, label_mask, P)
    ids = torch.cat([prompt_ids, label_ids[:, :-1].reshape(1, -1).expand(B, -1)], 1)
    kwargs: dict[str, Any] = {"use_cache": False}
    if P:  # the prefix's cache (computed once, or remembered) for every row; then everything after it
        n = prompt_mask.sum(-1)
        pre = prompt_ids[:1].gather(1, (T - n[:1, None]) + torch.arange(P, device=ids.device)[None])
        key = tuple(prefix) if prefix is not None else None
        kwargs = {"cache": prefix_cache(head, pre, B, prefix_memo, key), "use_cache": True}
    mask = layer_masks(visible[:, P:], pos[:, P:], pos, head.config, head.decoder, head.mask_dtype)
    hidden = decoder_call(head.decoder, input_ids=ids[:, P:], position_ids=pos[:, P:], attention_mask=mask,
                          **kwargs).last_hidden_state
    at = hidden[:, T - P - 1:]  # [B, 1 + M, H]: the last prompt token, then the tree
    # 2D into the head: a strided 3D slice makes torch pick a batched matmul that is ~30x slower on CPU
    logp = torch.log_softmax(head(at.reshape(-1, at.shape[-1])).float(), -1).view(B, at.shape[1], -1)
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
