"""backend/static.py, the static training step's pieces on tiny models built from configs: the packed shared-prefix pass against
the prefix-KV-cache pass it replaces, and (bf16) the LoRA weights cast once per step with the LoRA input left
uncast against peft's and autocast's casting at every layer; label scoring's uncast LoRA input likewise."""

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from finllm_pl import model as hf
from finllm_pl.backend.fast import FastBackend
from finllm_pl.backend.fast import module_forwards as fast_modules
from finllm_pl.backend.plain import decoder_call
from finllm_pl.backend.static import (StaticStep, pad_static_length, packed_prefix_attention, static_batch,
                                      static_hidden)
from finllm_pl.backend.tree import Head, layer_masks, prefix_cache, score_labels_tree
from finllm_pl.errors import ModelError


def _step(model, dtype=torch.float32, max_tokens=None):
    """The static step on peft's own LoRA forwards (backend/lora.py's route is compared in test_fused.py)."""
    return FastBackend(model, dtype, ["sparse_head", "static_step"], chunk_tokens=max_tokens).step

ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def _tiny_lora(arch: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    config = config_cls(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        attn_implementation=attn)
    model = hf.add_lora(model_cls(config).to(dtype), 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts in the comparison
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def _batch(prefix: int = 12, lengths=(3, 9, 5, 17), rows: int = 0):
    """A static batch of rows of different lengths that share their first `prefix` tokens (filled up to `rows`)."""
    g = torch.Generator().manual_seed(1)
    head = torch.randint(1, 97, (prefix,), generator=g)
    seqs = [torch.cat([head, torch.randint(1, 97, (n,), generator=g)]) for n in lengths]
    L = max(len(r) for r in seqs)
    ids = torch.stack([torch.cat([r, r.new_zeros(L - len(r))]) for r in seqs])
    mask = torch.stack([torch.arange(L) < len(r) for r in seqs]).long()
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, : prefix + 1] = -100  # supervised: everything after the prefix's next token
    return static_batch(ids, mask, labels, shared_prefix=8, rows=rows)


@pytest.mark.parametrize("arch, attn", [("qwen2", "sdpa"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_packed_prefix_pass_equals_the_prefix_cache_pass(arch, attn):
    """[prefix | row 1 | ... | row B] as one sequence gives every row's hidden states and LoRA gradients of the
    two-pass computation (prefix once, its KV cache expanded to every row), on more than one architecture."""
    model = _tiny_lora(arch, attn)
    head = Head(model)
    decoder = head.decoder
    st = _batch()
    assert st["g_pre"].shape == (1, 12)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(*st["g_ids"].shape, 64, generator=torch.Generator().manual_seed(2))

    def rows_and_grads(fn):
        hidden = fn()
        return hidden.detach(), torch.autograd.grad((hidden * weights).sum(), params)

    def two_pass():
        cache = prefix_cache(head, st["g_pre"], st["g_ids"].shape[0])
        P = st["g_pre"].shape[1]
        k_pos = torch.cat([torch.arange(P).expand(4, P), st["g_pos"]], 1)
        mask = layer_masks(st["g_mask"], st["g_pos"], k_pos, model.config, decoder, torch.float32)
        return decoder_call(decoder, input_ids=st["g_ids"], position_ids=st["g_pos"], cache=cache, use_cache=True,
                            attention_mask=mask).last_hidden_state

    ref, ref_grads = rows_and_grads(two_pass)
    calls = packed_prefix_attention.calls
    got, grads = rows_and_grads(lambda: static_hidden(head, st))
    assert packed_prefix_attention.calls - calls == 2  # once per layer: the packed path really ran
    assert decoder.config._attn_implementation == attn  # and the model's own attention is back
    assert got.shape == ref.shape == (4, 24, 64)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):  # (the packed pass always runs SDPA: vs eager, float rounding differs)
        torch.testing.assert_close(g, r, atol=1e-5 * r.abs().max(), rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads)


def test_packed_prefix_pass_names_models_whose_attention_it_cannot_reach():
    """A decoder whose attention ignores transformers' AttentionInterface cannot run the packed pass: a clear
    error that says which setting avoids it, not silently wrong attention."""
    class OwnAttention(torch.nn.Module):
        config = Qwen2Config()

        def forward(self, input_ids, **kwargs):
            return types.SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 8))

    st = _batch()
    head = types.SimpleNamespace(decoder=OwnAttention(), config=Qwen2Config(), mask_dtype=torch.float32)
    with pytest.raises(ModelError, match="AttentionInterface"):
        static_hidden(head, st)


@pytest.mark.parametrize("prefix", [12, 0])
def test_a_short_batch_filled_up_to_full_rows_gives_the_short_batch_s_loss_and_gradients(prefix):
    """An epoch's short last batch (3 rows where micro-batches hold 4) is filled up with a copy of its last row
    at weight 0 so it replays the full batches' graph shape: the same loss, token count and LoRA gradients as the
    3 rows alone, with and without the shared prefix."""
    model = _tiny_lora("qwen2")
    step = _step(model)
    short, filled = _batch(prefix, (3, 9, 17)), _batch(prefix, (3, 9, 17), rows=4)
    full = _batch(prefix, (3, 9, 5, 17))
    assert ("g_pre" in filled) == (prefix > 0)
    assert short["g_ids"].shape[0] == 3 and {k: v.shape for k, v in filled.items()} == {k: v.shape for k, v in full.items()}
    assert filled["g_w"][3].sum() == 0 and torch.equal(filled["g_ids"][3], filled["g_ids"][2])
    loss, n, grads = step.loss_and_grads(short)
    f_loss, f_n, f_grads = step.loss_and_grads(filled)
    assert n == f_n == short["g_w"].sum() > 0
    torch.testing.assert_close(f_loss, loss, atol=1e-5, rtol=1e-6)
    for g, r in zip(f_grads, grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)
    assert _batch(prefix, (3, 9, 5, 17), rows=2)["g_ids"].shape[0] == 4  # a full batch is left as it is


@pytest.mark.parametrize("prefix", [12, 0])
def test_a_batch_padded_to_a_longer_static_length_gives_the_same_loss_and_gradients(prefix):
    """pad_static_length (how chunked micro-batches share a few captured shapes): the padded batch gives the
    unpadded one's loss, token count and LoRA gradients; the real tokens' mask is unchanged and every new position
    sees something (an all-hidden query would be NaN in the masked attention)."""
    model = _tiny_lora("qwen2")
    step = _step(model)
    st = _batch(prefix)
    S = st["g_ids"].shape[1]
    padded = pad_static_length(st, S + 11)
    assert padded["g_ids"].shape[1] == S + 11 and pad_static_length(st, S) is st
    assert torch.equal(padded["g_mask"][:, :S, : st["g_mask"].shape[2]], st["g_mask"])
    assert not padded["g_mask"][:, :S, st["g_mask"].shape[2]:].any() and padded["g_mask"][:, S:].any(-1).all()
    assert torch.equal(padded["g_pos"][:, S - 1:], st["g_pos"][:, -1:] + torch.arange(12))
    loss, n, grads = step.loss_and_grads(st)
    p_loss, p_n, p_grads = step.loss_and_grads(padded)
    assert n == p_n > 0 and torch.isfinite(p_loss)
    torch.testing.assert_close(p_loss, loss, atol=1e-5, rtol=1e-6)
    for g, r in zip(p_grads, grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)


def test_chunked_batches_are_padded_to_a_power_of_two_within_the_token_cap(monkeypatch):
    """A micro-batch that runs as chunks is padded to a power-of-two length (a few shapes to capture), or less
    where that would make its chunks exceed model.chunk_tokens (as many rows each as unpadded); one that runs
    whole keeps its length."""
    model = _tiny_lora("qwen2")
    seen = []
    st = _batch(12)  # 4 rows of 24 tokens after the prefix
    for cap, expect, chunks in ((64, 32, 2), (50, 25, 2), (31, 31, 4), (None, 24, 1), (200, 24, 1)):
        step = _step(model, max_tokens=cap)
        monkeypatch.setattr(step, "_replay", lambda chunk: (seen.append(chunk["g_ids"].shape),
                                                            step.loss_and_grads(chunk))[1])
        seen.clear()
        step(st)
        assert {s[1] for s in seen} == {expect} and len(seen) == chunks, cap
        assert all(cap is None or s[0] * s[1] <= cap for s in seen)


def test_bf16_step_casts_lora_weights_once_and_feeds_lora_its_bf16_input_with_the_same_result(monkeypatch):
    """Under bf16 autocast the static step casts all LoRA weights to bf16 in one go (autocast would cast each at
    its matmul, and each gradient back) and gives the LoRA layers their bf16 input as it is (peft would cast it
    to the adapter's fp32, and autocast back to bf16 for the matmul): the same loss and gradients, bit for bit,
    with fewer copy kernels; afterwards the layers hold their fp32 weights and cast as peft does by default."""
    import peft.helpers

    model = _tiny_lora("qwen2", dtype=torch.bfloat16)  # a bf16 base (the adapter stays fp32, as peft keeps it)
    st = _batch()
    step = _step(model, torch.bfloat16)
    assert step.cast_adapter_once
    inputs, weights = [], []
    lora = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]

    def seen(m, args):
        inputs.append(args[0].dtype)
        weights.append(m.weight.dtype)

    hooks = [m.register_forward_pre_hook(seen) for m in lora]
    with _Copies() as copies:
        loss, n, grads = step.loss_and_grads(st)
    assert len(weights) == 2 * 4 * 2 and set(weights) == {torch.bfloat16}  # A and B of q/k/v/o in 2 layers
    assert set(inputs[::2]) == {torch.bfloat16}  # lora_A's input: x after dropout
    assert all(m.weight.dtype == torch.float32 for m in lora)
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    assert all(g.dtype == torch.float32 for g in grads)

    inputs.clear(), weights.clear()  # the reference: each weight cast at its matmul, peft's input casting on
    step.cast_adapter_once = False
    monkeypatch.setattr(peft.helpers, "disable_input_dtype_casting", lambda model, active=True: _nothing())
    with _Copies() as ref_copies:
        ref_loss, ref_n, ref_grads = step.loss_and_grads(st)
    # per step: 16 weight casts + 16 gradient casts + 8 input casts forward and backward -> 2 casts in all
    assert copies.n <= ref_copies.n - 46, (copies.n, ref_copies.n)
    assert set(weights) == {torch.float32} and set(inputs[::2]) == {torch.float32}
    for h in hooks:
        h.remove()
    assert n == ref_n and torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_label_scoring_feeds_lora_its_bf16_input_under_autocast_with_the_same_scores():
    """The fast backend's labeling context under bf16 autocast: the LoRA layers get their bf16 input as it is (no
    cast to the adapter's fp32 and back), scores bit-identical to peft's casting, fewer copies; without autocast
    (fp32 input and adapter) nothing changes."""
    from finllm_pl.batching import collate_prompts

    model = _tiny_lora("qwen2", dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    head = torch.randint(1, 97, (10,), generator=g).tolist()
    prompts = [head + torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 8, 5)]
    b = collate_prompts(prompts, 0, [[5, 1], [6, 1], [7, 8, 1]])
    backend = FastBackend(model, torch.bfloat16, ["sparse_head", "label_tree", "prefix_reuse"])  # peft's LoRA
    lora_a = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].dtype)) for m in lora_a]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with _Copies() as ref_copies:
            ref = score_labels_tree(Head(model), b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"],
                                    prefix=b["prefix_ids"])
        assert set(inputs) == {torch.float32}  # peft's default: the input cast to the adapter's dtype
        inputs.clear()
        with backend.labeling(), _Copies() as copies:
            got = backend.score(b)
        assert set(inputs) == {torch.bfloat16} and len(inputs) == 2 * 4 * 2  # prefix pass + rows pass
    assert torch.equal(got, ref)
    assert copies.n < ref_copies.n - 16, (copies.n, ref_copies.n)
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    with backend.labeling():  # no autocast: peft's casting stays on
        assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
        assert torch.backends.cuda.cudnn_sdp_enabled()  # (a CPU model: attention backends left alone)
    for h in hooks:
        h.remove()


def test_fast_modules_switch_cudnn_attention_off_when_asked_and_back():
    """The training step (on CUDA) and label scoring keep SDPA off cuDNN, which plans every new shape anew."""
    model = _tiny_lora("qwen2")
    with fast_modules(model, {}, uncast_lora_input=False, skip_cudnn_attention=True):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with fast_modules(model, {}, uncast_lora_input=False, skip_cudnn_attention=False):
        assert torch.backends.cuda.cudnn_sdp_enabled()


class _Copies(TorchDispatchMode):
    """Counts dtype-converting copies (aten._to_copy) run while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
