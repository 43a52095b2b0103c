"""finllm_pl/backend/kernels.py: which norms, MLPs and attention layers take the fused route, and that it computes what
they compute."""

import sys
import types
from contextlib import contextmanager

import pytest
import torch
from test_training import FAST, Losses, _adapter, _assert_trains_alike, _run
from lightning.pytorch import Callback
from torch.cuda.jiterator import _CodeParser

from finllm_pl.backend import kernels


def fused_layer_forwards(decoder):
    """{module: fused forward} for norms and MLPs, and the attention modules whose rotary embedding is fused."""
    forwards, rope = kernels.layer_forwards(decoder)
    return {**forwards, **{m: None for m in rope}}


def _tiny(arch: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100, head_dim=8, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:  # (initialised to ones: a weight that differs per channel tests more)
            p.data.normal_(1, 0.3)
    return model


@contextmanager
def _default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class OffsetRMSNorm(torch.nn.Module):
    """Gemma-style: scales by (1 + weight), not weight."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(n)), 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_rms_norms_and_silu_gated_mlps_take_the_fused_route(arch):
    decoder = _tiny(arch).model
    kernels.rms_norm_class.cache_clear()
    # under another default device and dtype, as Lightning's configure_model runs (the probes pin theirs)
    with torch.device("meta"), _default_dtype(torch.float64):
        forwards = fused_layer_forwards(decoder)
    expected = [m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm,
                                                        layer.mlp, layer.self_attn)] + [decoder.norm]
    assert set(forwards) == set(expected) and len(forwards) == 9


def test_other_norms_and_activations_keep_their_own_forward():
    gemma = _tiny("gemma").model  # (1 + weight) norms, GELU-tanh MLPs (and HF's usual rotary embedding)
    assert {type(m).__name__ for m in fused_layer_forwards(gemma)} == {"GemmaAttention"}
    gelu = _tiny("llama", hidden_act="gelu").model  # LlamaMLP's class, another activation
    kinds = {type(m).__name__ for m in fused_layer_forwards(gelu)}
    assert kinds == {"LlamaRMSNorm", "LlamaAttention"}
    odd = _tiny("qwen2").model
    odd.layers[0].input_layernorm = OffsetRMSNorm(32)
    assert odd.layers[0].input_layernorm not in fused_layer_forwards(odd)
    assert len(fused_layer_forwards(odd)) == 8


_INTERLEAVED = '''
import torch

def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's pairs (x0, x1), (x2, x3), ...: not HF's halves
    def rot(x):
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin

class Attention(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)

class Elsewhere(torch.nn.Module):  # does not call the file's function
    def forward(self, q, k, cos, sin):
        return q, k
'''


def test_attention_takes_the_fused_rotary_route_only_with_hf_s_rotary_embedding(monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    assert kernels.rope_attention_class(modeling_qwen2.Qwen2Attention)
    other = types.ModuleType("other_model")
    exec(_INTERLEAVED, other.__dict__)
    other.Attention.__module__ = other.Elsewhere.__module__ = "other_model"
    monkeypatch.setitem(sys.modules, "other_model", other)
    assert not kernels.rope_attention_class(other.Attention)  # the file's function, other math
    monkeypatch.setattr(other, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)
    kernels.rope_attention_class.cache_clear()
    assert kernels.rope_attention_class(other.Attention)  # now HF's
    assert not kernels.rope_attention_class(other.Elsewhere)  # but not called by this forward
    kernels.rope_attention_class.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_rounds_as_hf_s_forward_and_backward(dtype):
    """_Rope (here: eager torch in the kernel's order; on CUDA the jiterator kernel, tests/test_gpu.py) gives HF's
    apply_rotary_pos_emb bit for bit, and its gradients: the same kernel with sin's halves swapped and negated."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 5, 4, 8, generator=gen) * 3).to(dtype).transpose(1, 2).requires_grad_()  # as HF's: a view
    k = (torch.randn(2, 2, 5, 8, generator=gen) * 3).to(dtype).requires_grad_()
    cos, sin = (torch.randn(2, 5, 8, generator=gen).to(dtype) for _ in range(2))  # (not HF's equal halves)
    gq, gk = (torch.randn(t.shape, generator=gen).to(dtype) for t in (q, k))

    def run(fn):
        out = fn(q, k, cos, sin)
        return (*out, *torch.autograd.grad(out, (q, k), (gq, gk)))

    dispatch = kernels.RopeDispatch(apply_rotary_pos_emb)
    ref = run(apply_rotary_pos_emb)
    with kernels.fused_rope():
        got = run(dispatch)
    for name, a, b in zip(("q", "k", "dq", "dk"), got, ref):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), (name, (a.float() - b.float()).abs().max())
    sign = kernels.signs(q.device, dtype)
    assert torch.equal(got[0], kernels._Rope.apply(q, k, cos[:, None], sin[:, None], sign)[0])  # it ran _Rope


def test_the_rotary_dispatcher_runs_the_kernel_only_in_a_thread_that_asked(monkeypatch):
    """After install_rope, the model file's apply_rotary_pos_emb is HF's function everywhere but inside
    fused_rope() in the calling thread: a second thread running the same attention class at that moment (predict's
    warm-up, another model) computes HF's way, and both get HF's numbers."""
    import threading

    from transformers.models.qwen2 import modeling_qwen2

    decoder = _tiny("qwen2").model
    attn = decoder.layers[0].self_attn
    kernels.install_rope(type(attn))
    assert isinstance(modeling_qwen2.apply_rotary_pos_emb, kernels.RopeDispatch)
    calls = []
    monkeypatch.setattr(kernels._Rope, "apply", lambda *a, _f=kernels._Rope.apply: (calls.append(1), _f(*a))[1])
    x = torch.randn(2, 5, 32)
    pos = decoder.rotary_emb(x, torch.arange(5)[None].expand(2, -1))
    ref, _ = attn(x, position_embeddings=pos, attention_mask=None)
    assert not calls  # outside fused_rope(): HF's own
    inside, outside = threading.Event(), threading.Event()
    other = {}

    def elsewhere():
        inside.wait(10)
        other["out"], _ = attn(x, position_embeddings=pos, attention_mask=None)
        outside.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with kernels.fused_rope():
        got, _ = attn(x, position_embeddings=pos, attention_mask=None)
        inside.set()
        outside.wait(10)
    thread.join()
    assert calls == [1] and torch.equal(got, ref) and torch.equal(other["out"], ref)  # the thread: HF's way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forwards_compute_the_modules_results(dtype):
    decoder = _tiny("qwen2").model.to(dtype)
    forwards = fused_layer_forwards(decoder)
    layer = decoder.layers[1]
    x = (torch.randn(3, 5, 32) * 4).to(dtype).requires_grad_()
    for m in (layer.input_layernorm, layer.mlp):
        ref = m(x)
        (ref_grad,) = torch.autograd.grad(ref.float().pow(2).sum(), x)
        got = forwards[m](x)
        (grad,) = torch.autograd.grad(got.float().pow(2).sum(), x)
        assert got.dtype == ref.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
        else:  # the fused norm rounds once where HF's rounds twice: one bf16 step apart at most
            ulp = 2.0 ** (torch.frexp(ref.float().abs())[1] - 8).float()
            assert ((got.float() - ref.float()).abs() <= ulp).all()
    # a norm called with another dtype than its weight runs its own forward (HF promotes; rms_norm would not)
    n = layer.input_layernorm
    y = torch.randn(2, 32, dtype=torch.float64 if dtype == torch.float32 else torch.float32)
    assert forwards[n](y).dtype == n(y).dtype


def test_the_jiterator_kernels_are_code_jiterator_reads():
    for dtype, rounding in kernels._ROUND.items():
        fwd = _CodeParser(kernels._SILU_MUL.replace("ROUND", rounding))
        bwd = _CodeParser(kernels._SILU_MUL_BACKWARD.replace("ROUND", rounding))
        assert (fwd.function_name, bwd.function_name, bwd.return_type) == ("silu_mul", "silu_mul_backward", "void")
        rope = _CodeParser(kernels._ROPE.replace("ROUND", rounding))
        assert (rope.function_name, rope.return_type) == ("rope", "T")
    assert kernels._ROUND[torch.float32] == "v"  # no rounding of fp32 intermediates


def test_silu_mul_off_cuda_is_eager_torch():
    g, u = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    assert torch.equal(kernels.silu_mul(g, u), torch.nn.functional.silu(g) * u)


class Counting:
    """Counts F.rms_norm calls while training runs (not the backend's self-check on its stand-in)."""

    def __init__(self, monkeypatch):
        self.n, self.on = 0, False
        real = torch.nn.functional.rms_norm
        monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: (self.count(), real(*a, **k))[1])

    def count(self):
        self.n += self.on

    def callback(self):
        counting = self

        class During(Callback):
            def on_train_start(self, trainer, pl_module):
                counting.on = True

            def on_train_end(self, trainer, pl_module):
                counting.on = False
        return During()


@pytest.mark.parametrize("static", [True, False], ids=["static_step", "eager_step"])
def test_fused_kernels_train_like_the_modules_own_forwards(workdir, static, monkeypatch):
    """The kernels component in the static step (CUDA graphs' step, eager on CPU) and in the eager step: the same
    losses and adapter as the fast backend without it, with F.rms_norm really called, HF's forwards back after."""
    counting = Counting(monkeypatch)
    args = FAST + ["--model.lora_dropout", "0", "--trainer.max_epochs", "1"]
    skip = [] if static else ["static_step"]
    ref_losses, losses = Losses(), Losses()
    ref = _adapter(_run(args + ["--model.fast_skip", str(skip + ["kernels"])], [ref_losses, counting.callback()]))
    assert counting.n == 0
    cli = _run(args + ["--model.fast_skip", str(skip), "--checkpoint.dirpath", "ck_fused"],
               [losses, counting.callback()])
    backend = cli.model.backend
    assert counting.n > 0 and backend.on["kernels"] and (backend.step is not None) == static
    assert {type(m).__name__ for m in backend.forwards} >= {"Qwen2RMSNorm", "Qwen2MLP"}
    assert {type(m).__name__ for m in backend.rope} == {"Qwen2Attention"}
    assert not any("forward" in vars(m) for m in backend.forwards)  # the plain forwards are back after each step
    _assert_trains_alike(ref_losses, ref, losses, cli)


def test_fused_kernels_run_again_in_gradient_checkpointing_recompute(workdir, monkeypatch):
    """The eager step's backward runs inside the module forwards too, so gradient checkpointing's recomputed
    forwards use the fused norms as the first pass did (twice the calls), and the run trains like the checkpointed
    run without the kernels. (Gradient checkpointing rules the static step out.)"""
    counting = Counting(monkeypatch)
    args = FAST + ["--model.lora_dropout", "0", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"]
    _run(args + ["--model.fast_skip", "[static_step]", "--checkpoint.dirpath", "ck_a"], [counting.callback()])
    plain, counting.n = counting.n, 0
    ref_losses, losses = Losses(), Losses()
    ref = _adapter(_run(args + ["--model.gradient_checkpointing", "true", "--model.fast_skip", "[kernels]",
                                "--checkpoint.dirpath", "ck_b"], [ref_losses, counting.callback()]))
    assert counting.n == 0
    cli = _run(args + ["--model.gradient_checkpointing", "true", "--checkpoint.dirpath", "ck_c"],
               [losses, counting.callback()])
    assert cli.model.backend.step is None and counting.n > 1.5 * plain > 0
    _assert_trains_alike(ref_losses, ref, losses, cli)
