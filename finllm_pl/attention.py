"""Grouped-query attention under a custom mask without repeating keys and values per query head (plain torch).

Why: label scoring runs SDPA with a custom 4D mask (the prompt + label tree of scoring.py). Under a mask, HF's
`sdpa_attention_forward` cannot use SDPA's own grouped-query support (CUDA's memory-efficient kernel has none), so
it copies each layer's keys and values once per query head of their group (`repeat_kv`: 6 copies each for the
1.5B model's 12 query and 2 key/value heads), and SDPA turns the boolean mask into a float one in every layer.
Here the g query heads that share a key/value head are laid end to end along the query axis instead (`folded`):
query head h = k * g + j's row t becomes row j * T + t of key/value head k, and the mask is repeated g times along
that axis once per forward (not per layer), already additive and aligned as the kernel wants it. Each query row
still attends to the same keys under the same mask, one row at a time: the same kernel, the same bits.

Measured on an H100 (results/gpu/predict_rows_fold_early_workers.json): one layer's attention at labeling's shapes
0.63 -> 0.48 ms (239 rows x 95 queries over 140 keys), 0.46 -> 0.19 ms (520 x 21 over 66), the same bits
(tests/test_gpu.py); with fused.py's in-place LoRA add, the 13,173-row job's GPU time 4.17-4.33 -> 3.86-3.97 s
(3 + 3 runs alternating, one machine), the same output bits.

Used while labeling (no gradients) on CUDA: kernels.py's attention forward puts `FoldedAttention` in place of its
model file's attention registry while it runs. Anything else (training, no mask, one query row, dropout, other
arguments, one query head per key/value head) runs the registry's own function.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

REGISTRY = "ALL_ATTENTION_FUNCTIONS"  # the name HF model files look their attention function up under
FOLD_DEVICES = ("cuda",)  # where it was measured (the same bits there); elsewhere HF's sdpa path as it is
MASK_ALIGN = 16  # SDPA's memory-efficient kernel copies a mask whose rows are not a multiple of this apart


# Folded masks by their source mask (a forward's layers all pass the same one), for as long as it lives: a job's
# last mask goes when its batch does, nothing is held after labeling. (By id with a weak reference: tensors compare
# elementwise, so they cannot key a WeakKeyDictionary.)
_FOLDED: dict[int, tuple[weakref.ref, dict]] = {}


def folded_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, groups * Tq, Tk] additive mask (0 or -inf, in `dtype`) of a [B, 1, Tq, Tk] boolean or additive one,
    its row j * Tq + t being row t; rows MASK_ALIGN-aligned in memory. Made once per mask, group count and dtype."""
    entry = _FOLDED.get(id(mask))
    if entry is None or entry[0]() is not mask:
        key = id(mask)
        entry = _FOLDED[key] = (weakref.ref(mask, lambda _, key=key: _FOLDED.pop(key, None)), {})
    made = entry[1]
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


class FoldedAttention:
    """A model file's attention registry as its attention layers see it during label scoring: "sdpa" folds the
    query heads where it can (`foldable`), every other entry and call is the registry's own."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def _wrap(self, name: str, fn: Callable) -> Callable:
        if name != "sdpa" or fn is not sdpa_attention_forward:  # (what folded_sdpa stands in for, nothing else)
            return fn

        def sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
            if foldable(module, query, key, attention_mask, dropout, kwargs):
                return folded_sdpa(module, query, key, value, attention_mask, scaling)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                      is_causal=is_causal, **kwargs)
        return sdpa

    def get_interface(self, name: str, default: Callable) -> Callable:
        return self._wrap(name, self.registry.get_interface(name, default))

    def __getitem__(self, name: str) -> Callable:
        return self._wrap(name, self.registry[name])

    def __getattr__(self, attr: str) -> Any:  # (anything else the file asks of the registry)
        return getattr(self.registry, attr)

    def __contains__(self, name: str) -> bool:
        return name in self.registry
