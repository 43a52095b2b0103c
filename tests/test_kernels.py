"""finllm_pl/kernels.py: which norms, MLPs and attention layers take the fused route, and that it computes what
they compute."""

import sys
import types
from contextlib import contextmanager

import pytest
import torch
from test_training import FAST, Losses, _adapter, _assert_trains_alike, _run
from torch.cuda.jiterator import _CodeParser

from finllm_pl import kernels
from finllm_pl.kernels import fused_layer_forwards


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

    ref, got = run(apply_rotary_pos_emb), run(kernels._fused_rope(apply_rotary_pos_emb))
    for name, a, b in zip(("q", "k", "dq", "dk"), got, ref):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), (name, (a.float() - b.float()).abs().max())
    assert torch.equal(got[0], kernels._Rope.apply(q, k, cos[:, None], sin[:, None])[0])  # it ran _Rope


def test_fused_attention_forward_runs_the_fused_rotary_and_puts_hf_s_back(monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    decoder = _tiny("qwen2").model
    attn = decoder.layers[0].self_attn
    forward = fused_layer_forwards(decoder)[attn]
    calls = []
    monkeypatch.setattr(kernels._Rope, "apply", lambda *a, _f=kernels._Rope.apply: (calls.append(1), _f(*a))[1])
    x = torch.randn(2, 5, 32)
    pos = decoder.rotary_emb(x, torch.arange(5)[None].expand(2, -1))
    ref, _ = attn(x, position_embeddings=pos, attention_mask=None)
    got, _ = forward(x, position_embeddings=pos, attention_mask=None)
    assert calls == [1] and torch.equal(got, ref)
    assert modeling_qwen2.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb"
    assert modeling_qwen2.apply_rotary_pos_emb.__module__ == modeling_qwen2.__name__  # HF's own again


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


@pytest.mark.parametrize("graphs", [True, False], ids=["static_step", "eager_step"])
def test_fused_layers_train_like_the_modules_own_forwards(workdir, graphs, monkeypatch):
    """model.fused_layers in the CUDA-graph (here: static, eager on CPU) step and in the plain eager step: the
    same losses and adapter as without it, with F.rms_norm really called."""
    calls = []
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: (calls.append(1), rms_norm(*a, **k))[1])
    args = FAST + ["--model.lora_dropout", "0", "--trainer.max_epochs", "1", "--model.cuda_graphs", str(graphs).lower()]
    ref_losses, losses = Losses(), Losses()
    ref = _adapter(_run(args, [ref_losses]))
    assert not calls
    cli = _run(args + ["--model.fused_layers", "true", "--checkpoint.dirpath", "ck_fused"], [losses])
    assert len(calls) > 0
    forwards = cli.model._graphed.forwards if graphs else cli.model._train_forwards
    assert {type(m).__name__ for m in forwards} >= {"Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention"}
    assert not any("forward" in vars(m) for m in forwards)  # the plain forwards are back after each step
    _assert_trains_alike(ref_losses, ref, losses, cli)


def test_fused_layers_run_again_in_gradient_checkpointing_recompute(workdir, monkeypatch):
    """The eager step's backward runs inside fast_modules too, so gradient checkpointing's recomputed forwards use
    the fused norms as the first pass did (twice the calls), and the run trains like the plain checkpointed one."""
    counts = {}
    rms_norm = torch.nn.functional.rms_norm

    def counting(*a, **k):
        counts[key] = counts.get(key, 0) + 1
        return rms_norm(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "rms_norm", counting)
    args = FAST + ["--model.lora_dropout", "0", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"]
    key = "plain"
    _run(args + ["--model.fused_layers", "true", "--checkpoint.dirpath", "ck_a"])
    ref_losses, losses = Losses(), Losses()
    key = "reference"
    ref = _adapter(_run(args + ["--model.gradient_checkpointing", "true", "--checkpoint.dirpath", "ck_b"], [ref_losses]))
    key = "checkpointed"
    cli = _run(args + ["--model.gradient_checkpointing", "true", "--model.fused_layers", "true",
                       "--checkpoint.dirpath", "ck_c"], [losses])
    assert "reference" not in counts and counts["checkpointed"] > 1.5 * counts["plain"] > 0
    _assert_trains_alike(ref_losses, ref, losses, cli)


def test_kernels_compile_in_a_background_thread_on_cuda_only_and_are_waited_for(monkeypatch):
    """compile_in_background starts one thread for bf16/fp32 on a CUDA device (tests/test_gpu.py checks what it
    compiles), and the first kernel use waits for it."""
    import threading

    release, ran = threading.Event(), []

    def compile_all(device, dtype):
        release.wait(10)
        ran.append((device, dtype))

    monkeypatch.setattr(kernels, "_compile_all", compile_all)
    monkeypatch.setattr(kernels, "_COMPILER", None)
    kernels.compile_in_background(torch.device("cpu"), torch.bfloat16)
    kernels.compile_in_background(torch.device("cuda", 1), torch.float16)
    assert kernels._COMPILER is None  # nothing to compile for the CPU, nor for fp16
    kernels.compile_in_background(torch.device("cuda", 1), torch.bfloat16)
    thread = kernels._COMPILER
    kernels.compile_in_background(torch.device("cuda", 1), torch.bfloat16)
    assert kernels._COMPILER is thread and thread.is_alive() and not ran
    release.set()
    kernels._wait_for_compiler()  # (what _jitted does first)
    assert ran == [(torch.device("cuda", 1), torch.bfloat16)] and kernels._COMPILER is None
