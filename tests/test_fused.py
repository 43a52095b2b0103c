"""backend/lora.py's attention linears (q/k/v as one matmul, LoRA's A and B batched, B adding into the base output) against
peft's own forwards: the same outputs and gradients, independent dropout masks, merged adapters seen, peft's
forward whenever the case is not the plain one."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from finllm_pl import model as hf
from finllm_pl.backend.fast import module_forwards as fast_modules
from finllm_pl.backend.lora import group_forwards, lora_groups
from finllm_pl.backend.plain import base_model


def _decoder(model):
    return base_model(model).get_decoder()


def fused_forwards(decoder, groups=None):
    """The groups' forwards (the groups made here unless given: a test that changes weights keeps them, to
    invalidate them as the backend does)."""
    return group_forwards(lora_groups(decoder) if groups is None else groups)

ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}  # (biased q/k/v, not)


def _tiny(arch: str = "qwen2", dropout: float = 0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    config = config_cls(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = hf.add_lora(model_cls(config), 4, 8, dropout, list(targets))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


class _Matmuls(TorchDispatchMode):
    """Counts the matmul kernels (mm, addmm, bmm) run while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _hidden_and_grads(model, forwards, ids):
    decoder = _decoder(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with fast_modules(model, forwards, uncast_lora_input=False, skip_cudnn_attention=False), _Matmuls() as mm:
        hidden = decoder(input_ids=ids).last_hidden_state
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    return hidden.detach(), torch.autograd.grad((hidden * weights).sum(), params), mm.n


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fused_attention_linears_give_peft_outputs_and_gradients_with_half_the_matmuls(arch):
    model = _tiny(arch)
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    ref, ref_grads, ref_mm = _hidden_and_grads(model, {}, ids)
    forwards = fused_forwards(_decoder(model))
    assert len(forwards) == 2 * 4  # q, k, v and o of each layer
    got, grads, mm = _hidden_and_grads(model, forwards, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5 * r.abs().max(), rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)
    # forward, per layer: peft 3 (base, A, B) x 4 linears; fused 3 for q/k/v + 3 for o; the MLP's 3 in both
    assert (ref_mm, mm) == (2 * (12 + 3), 2 * (6 + 3))
    assert not any("forward" in vars(m) for m in forwards)  # the modules' own forwards are back


class _Attention(torch.nn.Module):
    """q/k/v/o linears of width 8 (enough to see the dropout masks through identity adapters)."""

    def __init__(self):
        super().__init__()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, n, torch.nn.Linear(8, 8, bias=True))


def _identity_lora(dropout: float):
    """peft LoRA of rank 8 = width, A = B = identity, scale 1: each linear's LoRA update is its dropped-out input."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Attention(), LoraConfig(r=8, lora_alpha=8, lora_dropout=dropout,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.eye(8))
            else:
                p.requires_grad_(False)
    return model, model.base_model.model


def _qkv(attn, forwards, x):
    with fast_modules(attn, forwards, uncast_lora_input=False, skip_cudnn_attention=False):
        return [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]


def test_fused_lora_draws_an_independent_dropout_mask_for_each_linear():
    model, attn = _identity_lora(dropout=0.5)
    forwards = fused_forwards(model)
    x = torch.rand(64, 32, 8) + 1.0  # no zeros: a dropped entry shows as a 0 in the LoRA update
    model.train()
    outs = _qkv(attn, forwards, x)
    masks = []
    for name, out in zip(("q_proj", "k_proj", "v_proj"), outs):
        update = out - getattr(attn, name).get_base_layer()(x)
        kept = update.abs() > 1e-4
        # each entry either dropped or x / (1 - p), as peft's nn.Dropout gives
        torch.testing.assert_close(update[kept], (x / 0.5)[kept])
        assert update[~kept].abs().max() < 1e-4
        assert abs(kept.float().mean().item() - 0.5) < 0.02
        masks.append(kept)
    assert 0.4 < (masks[0] == masks[1]).float().mean().item() < 0.6  # independent, not one shared mask
    assert 0.4 < (masks[1] == masks[2]).float().mean().item() < 0.6
    model.eval()  # no dropout: the update is the whole input
    for name, out in zip(("q_proj", "k_proj", "v_proj"), _qkv(attn, forwards, x)):
        torch.testing.assert_close(out, getattr(attn, name).get_base_layer()(x) + x)


def test_fused_linears_see_merged_adapters_and_fall_back_to_peft_outside_the_plain_case():
    """Cached concatenated weights are made again after `invalidate()` (what the backend's weights_changed() calls
    after a merge, an unmerge, a load); disabled adapters and another input for k_proj each get the right output."""
    model, attn = _identity_lora(dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    attn.k_proj.scaling["default"] = 3.0  # (peft's alpha_pattern: linears of one group with different scales)
    groups = lora_groups(model)
    forwards = fused_forwards(model, groups)
    x = torch.randn(5, 8)
    ref = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    for got, r in zip(_qkv(attn, forwards, x), ref):  # (made the concatenated weight: cached from here on)
        torch.testing.assert_close(got, r)
    model.merge_adapter()  # peft writes the merged weights into weight.data: the cached concatenation is stale
    stale = _qkv(attn, forwards, x)
    assert not torch.allclose(stale[0], ref[0], atol=1e-3)  # (what the signal is for)
    for group in groups:
        group.invalidate()
    for got, r in zip(_qkv(attn, forwards, x), ref):
        torch.testing.assert_close(got, r, atol=1e-5, rtol=1e-5)
    with fast_modules(attn, forwards, uncast_lora_input=False, skip_cudnn_attention=False), _Matmuls() as mm:
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert mm.n == 1  # merged: the base alone, one matmul for the three
    model.unmerge_adapter()
    for group in groups:
        group.invalidate()
    for got, r in zip(_qkv(attn, forwards, x), ref):
        torch.testing.assert_close(got, r, atol=1e-5, rtol=1e-5)

    base = [getattr(attn, n).get_base_layer()(x) for n in ("q_proj", "k_proj", "v_proj")]
    with model.disable_adapter():  # peft's own forward: the base alone
        for got, r in zip(_qkv(attn, forwards, x), base):
            torch.testing.assert_close(got, r)
    other = torch.randn(5, 8)  # k_proj called with another input than q_proj's: its own forward
    with fast_modules(attn, forwards, uncast_lora_input=False, skip_cudnn_attention=False):
        q, k = attn.q_proj(x), attn.k_proj(other)
    torch.testing.assert_close(q, ref[0])
    with torch.no_grad():
        torch.testing.assert_close(k, attn.k_proj(other))


def test_fused_lora_keeps_its_adapter_matrices_without_gradients_until_told_they_changed(monkeypatch):
    """Labeling (no gradients) concatenates the A's and builds the B's block-diagonal once, not at every call, until
    `invalidate()`: an optimizer step writes the adapter in place without a sign a cache could see (fused AdamW does
    not even bump the tensors' version counters), so the backend says so; with gradients, every call makes its own
    (autograd must see them)."""
    model, attn = _identity_lora(dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    groups = lora_groups(model)
    forwards = fused_forwards(model, groups)
    x = torch.randn(5, 8)
    made = []
    block_diag = torch.block_diag
    monkeypatch.setattr(torch, "block_diag", lambda *ts: made.append(1) or block_diag(*ts))

    def same_as_peft(grad: bool) -> int:
        del made[:]
        with torch.no_grad():
            ref = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
        with torch.set_grad_enabled(grad):
            got = _qkv(attn, forwards, x)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r)
        return len(made)

    assert same_as_peft(grad=False) == 1
    assert same_as_peft(grad=False) == 0  # kept
    params = [p for n, p in model.named_parameters() if "lora_A" in n]
    opt = torch.optim.AdamW(params, lr=0.5, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    versions = [p._version for p in params]
    opt.step()  # the real optimizer, in place
    assert [p._version for p in params] == versions  # (no version bump a cache could key on)
    for group in groups:
        group.invalidate()
    assert same_as_peft(grad=False) == 1  # made again, and the new adapter is used
    assert same_as_peft(grad=True) == 1 and same_as_peft(grad=True) == 1


def test_fused_forwards_skip_attention_layers_whose_linears_do_not_fit():
    """LoRA on q and v only (k a plain frozen linear): q/k/v are not one group; q, v and o run alone."""
    model = _tiny("qwen2", targets=("q_proj", "v_proj", "o_proj"))
    forwards = fused_forwards(_decoder(model))
    names = {n.split(".")[-1] for n, m in model.named_modules() if m in forwards}
    assert names == {"q_proj", "v_proj", "o_proj"}
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    ref, ref_grads, _ = _hidden_and_grads(model, {}, ids)
    got, grads, _ = _hidden_and_grads(model, forwards, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5 * r.abs().max(), rtol=1e-4)
