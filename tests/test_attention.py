"""backend/attention.py: grouped query heads folded onto their key/value head under a custom mask (label scoring)."""

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from finllm_pl.backend import attention
from finllm_pl.backend.attention import folded_attention, folded_mask, folded_sdpa, folded_sdpa_or_sdpa, foldable
from finllm_pl.backend.fast import FastBackend
from test_kernels import _tiny


def _inputs(B, H, Hkv, Tq, Tk, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen).transpose(1, 2)  # (a view, as HF's attention makes it)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=gen) for _ in range(2))
    mask = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.4
    mask[..., -1] = True  # every query sees a key
    return q, k, v, mask


@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 1), (12, 2)])
@pytest.mark.parametrize("additive", [False, True])
def test_folded_sdpa_computes_hf_s_sdpa_under_a_custom_mask(H, Hkv, additive):
    q, k, v, mask = _inputs(3, H, Hkv, 5, 9)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    module = types.SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=True)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, _ = folded_sdpa(module, q, k, v, mask, 0.3)
    assert got.shape == ref.shape == (3, 5, H, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # (on CUDA bit for bit: tests/test_gpu.py)


def test_folded_mask_repeats_the_rows_per_query_head_aligned_and_once_per_mask():
    _, _, _, mask = _inputs(2, 6, 2, 5, 9)
    folded = folded_mask(mask, 3, torch.float32)
    assert folded.shape == (2, 1, 15, 9) and folded.stride(2) % attention.MASK_ALIGN == 0
    for j in range(3):  # row j * Tq + t is row t: 0 where visible, -inf elsewhere
        rows = folded[:, :, j * 5:(j + 1) * 5]
        assert torch.equal(rows == 0, mask) and torch.isneginf(rows[~mask]).all()
    assert folded_mask(mask, 3, torch.float32) is folded  # the next layers: made once
    assert folded_mask(mask.clone(), 3, torch.float32) is not folded
    assert folded_mask(mask, 2, torch.float32).shape == (2, 1, 10, 9)
    assert set(mask._finllm_folded) == {(3, torch.float32), (2, torch.float32)}  # kept with the mask, nowhere else


def test_only_label_scoring_s_calls_fold(monkeypatch):
    q, k, v, mask = _inputs(2, 4, 2, 5, 9)
    module = types.SimpleNamespace(num_key_value_groups=2)
    with torch.no_grad():
        assert not foldable(module, q, k, mask, 0.0, {})  # not a FOLD_DEVICES device
    monkeypatch.setattr(attention, "FOLD_DEVICES", ("cpu",))
    with torch.no_grad():
        assert foldable(module, q, k, mask, 0.0, {"sliding_window": None, "position_ids": None})
        assert not foldable(module, q, k, None, 0.0, {})  # no mask: SDPA's own GQA
        assert not foldable(module, q, k, mask[:, :, :1].expand(-1, 2, -1, -1), 0.0, {})  # a mask per head
        assert not foldable(module, q[:, :, :1], k, mask[:, :, :1], 0.0, {})  # one query row (HF packs it)
        assert not foldable(module, q, k, mask, 0.1, {})  # dropout
        assert not foldable(module, q, k, mask, 0.0, {"softcap": 30.0})
        assert not foldable(module, q, k, mask, 0.0, {"position_bias": torch.zeros(1)})
        assert not foldable(types.SimpleNamespace(num_key_value_groups=1), q, k, mask, 0.0, {})
    assert not foldable(module, q, k, mask, 0.0, {})  # gradients: training keeps HF's path

    # what runs in the folded model's layers: folding where it can, HF's sdpa function everywhere else
    calls = []
    monkeypatch.setattr(attention, "folded_sdpa", lambda *a: calls.append("folded") or (None, None))
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append("hf") or (None, None))
    with torch.no_grad():
        folded_sdpa_or_sdpa(module, q, k, v, mask)
        folded_sdpa_or_sdpa(module, q, k, v, None)
    assert calls == ["folded", "hf"]


def test_only_the_labeling_model_attends_folded_and_gets_sdpa_back():
    """folded_attention switches one model's attention implementation (its config), not the process's: another
    model of the same class keeps HF's sdpa; eager models are left alone; the setting is restored."""
    a, b, eager = _tiny("qwen2"), _tiny("qwen2"), _tiny("qwen2", attn_implementation="eager")
    with folded_attention(a.config), folded_attention(eager.config):
        assert a.config._attn_implementation == attention.FOLDED
        assert b.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    assert a.config._attn_implementation == "sdpa"


def test_label_scoring_folds_the_query_heads_once_per_mask(monkeypatch):
    """Through the fast backend's labeling context: every layer's attention ran folded, the mask was folded once
    for all layers, and the scores are HF's path's."""
    model = _tiny("qwen2")  # 4 query heads on 2 key/value heads
    model.eval()
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, 100, (3, 11), generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :4] = 0  # left padding
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "label_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "label_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}

    def scores(fold: bool):
        monkeypatch.setattr(attention, "FOLD_DEVICES", ("cpu",) if fold else ())
        calls, masks = [], []
        monkeypatch.setattr(attention, "folded_sdpa", lambda *a, _f=folded_sdpa: (calls.append(1), _f(*a))[1])
        monkeypatch.setattr(attention, "_fold", lambda *a, _f=attention._fold: (masks.append(1), _f(*a))[1])
        backend = FastBackend(model, torch.float32, ["sparse_head", "label_tree", "folded_attention"])
        with torch.no_grad(), backend.labeling():
            out = backend.score(batch)
        monkeypatch.undo()
        return out, len(calls), len(masks)

    (plain, n_plain, _), (folded, n_folded, n_masks) = scores(False), scores(True)
    assert n_plain == 0 and n_folded == model.config.num_hidden_layers
    assert n_masks == 1  # the mask folded once for all layers
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
