"""Grouped-query attention under a custom mask without repeating keys and values per query head (fast component
`folded_attention`; plain torch + transformers).

Why: label scoring runs SDPA with a custom 4D mask (the prompt + label tree of tree.py). Under a mask, HF's
`sdpa_attention_forward` cannot use SDPA's own grouped-query support (CUDA's memory-efficient kernel has none), so
it copies each layer's keys and values once per query head of their group (`repeat_kv`: 6 copies each for the
1.5B model's 12 query and 2 key/value heads), and SDPA turns the boolean mask into a float one in every layer.
Here the g query heads that share a key/value head are laid end to end along the query axis instead (`folded`):
query head h = k * g + j's row t becomes row j * T + t of key/value head k, and the mask is repeated g times along
that axis once per forward (not per layer; kept on the mask tensor itself, so it goes with it), already additive and
aligned as the kernel wants it. Each query row still attends to the same keys under the same mask, one row at a
time: the same kernel, the same bits (tests/test_gpu.py).

How it is put in place: `folded_sdpa_or_sdpa` is registered with transformers' AttentionInterface under its own name
(a named entry, registered once), and the backend's labeling context sets a model's `config._attn_implementation`
to that name while it labels (that model alone; its mask code is sdpa's). It folds only what it can
(`foldable`: no gradients, CUDA, a 4D mask, more query heads than key/value heads, no dropout or soft-capping);
every other call runs HF's sdpa function as it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FOLDED = "finllm_folded_sdpa"  # the name folded_sdpa_or_sdpa is registered under
FOLD_DEVICES = ("cuda",)  # where it was measured (the same bits there); elsewhere HF's sdpa path as it is
MASK_ALIGN = 16  # SDPA's memory-efficient kernel copies a mask whose rows are not a multiple of this apart


def folded_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, groups * Tq, Tk] additive mask (0 or -inf, in `dtype`) of a [B, 1, Tq, Tk] boolean or additive one,
    its row j * Tq + t being row t; rows MASK_ALIGN-aligned in memory. Made once per mask, group count and dtype
    (kept as an attribute of the mask tensor: every layer of a forward gets the same mask object)."""
    made = getattr(mask, "_finllm_folded", None)
    if made is None:
        made = mask._finllm_folded = {}
    if (groups, dtype) not in made:
        made[groups, dtype] = _fold(mask, groups, dtype)
    return made[groups, dtype]


def _fold(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    B, _, Tq, Tk = mask.shape
    width = -(-Tk // MASK_ALIGN) * MASK_ALIGN
    out = torch.empty(B, 1, groups, Tq, width, dtype=dtype, device=mask.device)[..., :Tk]
    if mask.dtype == torch.bool:  # as SDPA converts it: 0 where visible, -inf elsewhere
        add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    else:
        add = mask.to(dtype)
    out.copy_(add[:, :, None])
    return out.flatten(2, 3)


def foldable(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
             dropout: float, kwargs: dict) -> bool:
    """Whether `folded_sdpa` computes this call (else the registry's own function does)."""
    H, Hkv = query.shape[1], key.shape[1]
    return (query.device.type in FOLD_DEVICES and not torch.is_grad_enabled()
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and query.shape[2] > 1
            and H > Hkv and H % Hkv == 0 and getattr(module, "num_key_value_groups", None) == H // Hkv
            and not dropout and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions"))  # (what else HF's sdpa function reads from its kwargs)


def folded_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor, scaling: Optional[float] = None) -> tuple[torch.Tensor, None]:
    """HF's sdpa_attention_forward for q [B, H, Tq, D], k/v [B, Hkv, Tk, D] under a [B, 1, Tq, Tk] mask, with the
    query heads folded onto their key/value head: output [B, Tq, H, D] as HF returns it."""
    B, H, Tq, D = query.shape
    Hkv = key.shape[1]
    g = H // Hkv
    mask = folded_mask(attention_mask, g, query.dtype)
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, g * Tq, D), key, value, attn_mask=mask,
                                         scale=scaling)  # [B, Hkv, g * Tq, Dv]
    # [B, Hkv, g * Tq, Dv] -> [B, Tq, H, Dv] (query head k * g + j), one copy as HF's transpose(1, 2).contiguous()
    return out.unflatten(2, (g, Tq)).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, -1), None


def folded_sdpa_or_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Any, dropout: float = 0.0, scaling: Optional[float] = None,
                        is_causal: Optional[bool] = None, **kwargs):
    """HF's sdpa attention function, folded where `foldable`."""
    if foldable(module, query, key, attention_mask, dropout, kwargs):
        return folded_sdpa(module, query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FOLDED, folded_sdpa_or_sdpa)
    AttentionMaskInterface.register(FOLDED, sdpa_mask)


@contextmanager
def folded_attention(config) -> Iterator[None]:
    """While the block runs, the model whose config this is attends through folded_sdpa_or_sdpa (if it attends
    through HF's sdpa function; other implementations are left as they are)."""
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = FOLDED
    try:
        yield
    finally:
        config._attn_implementation = before
