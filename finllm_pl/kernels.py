"""The decoder layers' norms, gated MLPs and rotary embeddings in fused kernels that need no compiling (plain torch;
the fast paths put them in place through graphs.fast_modules).

Why: written as HF writes them, an RMSNorm is ~8 elementwise kernels forward and more backward (fp32 casts, square,
mean, rsqrt, two products), and a gated MLP's `act(gate) * up` two kernels forward and three backward, each reading
or writing a whole [tokens, width] tensor. torch.compile fuses them (model.compile_layers), but compiling them costs
~5-6 s in a new process (dynamo, AOT autograd, inductor, Triton), which is most of what the first epoch costs
beyond the later ones. Here:
- An RMSNorm runs as torch's own `F.rms_norm`, one fused kernel on CUDA, forward and backward. It rounds once
  (normalise and scale in fp32) where HF rounds the normalised value before scaling: at most ~1 bf16 ulp apart.
- A SiLU-gated MLP's `silu(gate) * up` runs as one elementwise kernel forward and one (two outputs) backward, made
  by torch's jiterator (NVRTC compiles it in a fraction of a second, at the first call). It rounds as eager torch
  does: silu's output to the input dtype, then the product; backward as autograd's mul and silu_backward. It
  keeps `gate` and `up` for the backward, not silu's output too.
Measured on an H100 (new processes, empty inductor and Triton caches):
- 28 layers' norms + MLP at 2,592 tokens, forward + backward from a CUDA graph: eager 33.9 ms, torch.compile'd
  23.5-23.7, these 23.7, Liger-Kernel's Triton kernels 24.0; the first call (compiling) 5.5-6.0 s compiled, 2.6-3.3
  Liger, 0.65 these (0.21 with torch's NVRTC disk cache; benchmarks/norm_mlp_first_call.py,
  results/gpu/norm_mlp_first_call.json).
- The fast config's two epochs through the CLI, instead of compile_layers: first epoch 21.2 -> 16.7 and 16.5 s,
  later 13.3 s either way, peak 8.9 -> 9.5 GiB, the same losses (results/gpu/fit_epoch_fused_layers*.json).
- predict, 13,173 rows (which compile_layers does not compile for): 2,407 -> 2,780 and 2,705 rows/s from the first
  batch (results/gpu/predict_rows_fused_layers*.json).
- The rotary embedding, HF's `q * cos + rotate_half(q) * sin` (and k's), is ~10 kernels forward and ~18 backward
  per layer (neg, cat, two products and a sum; slices' zero-filled gradients): here one jiterator kernel per tensor
  each way (the backward is the same kernel with sin's halves swapped and negated), rounded as eager torch rounds
  it (bit for bit, tests/test_gpu.py). It is put in place by the attention layer's forward, which swaps its model
  file's `apply_rotary_pos_emb` for the fused one while it runs. Per layer (benchmarks/rope_kernel.py,
  results/gpu/rope_kernel.json): 0.61 -> 0.49 ms forward + backward at the packed step's 2,600 tokens, 0.55-0.66
  -> 0.26-0.31 ms forward on labeling batches. Through the CLI, with the chunk padding of graphs.py (separate
  calls, new processes; results/gpu/fit_epoch_rope*.json): first epoch 16.8 -> 15.3 s, later 13.4 -> 12.8 s;
  predict, 13,173 rows: 2,728 -> 2,893 rows/s from the first batch.
- The three kernels are compiled by a thread while the model loads (`compile_in_background`, started by the
  LightningModule's configure_model), not in the first training step: first step 2.39 -> 0.78 s, first epoch
  16.4 -> 14.3 s (one call, results/gpu/fit_epoch_compile_thread.json); labeling unchanged (2,918 and 2,842 vs
  2,883 rows/s from the first batch, results/gpu/predict_rows_compile_thread.json).
A module takes this route only if its class computes the same thing: its forward is run once on tiny random
weights (CPU, fp32) against the formula (`rms_norm_class`, `silu_gated_mlp_class`, `rope_attention_class`). Off
CUDA, or in other dtypes, the gated product runs as eager torch; the rotary embedding as eager torch in the kernel's
order (the same bits: the CPU tests check its backward formula).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .attention import REGISTRY, FoldedAttention

# NVRTC code for torch.cuda.jiterator, math in fp32 (torch's opmath for bf16 and fp32). Jiterator may hand a bf16
# kernel fp32 values (T), so where eager torch rounds an intermediate to bf16 (silu's output, the product's
# gradient), R rounds it explicitly (to nearest even, as a bf16 store does); R is the identity for fp32 tensors.
_SILU_MUL = """
template <typename T> T silu_mul(T g, T u) {
  auto R = [](float v) { return ROUND; };
  float x = static_cast<float>(g);
  float s = R(x / (1.0f + ::expf(-x)));
  return static_cast<T>(s * static_cast<float>(u));
}"""
_SILU_MUL_BACKWARD = """
template <typename T> void silu_mul_backward(T dp, T g, T u, T& dg, T& du) {
  auto R = [](float v) { return ROUND; };
  float x = static_cast<float>(g);
  float d = static_cast<float>(dp);
  float sig = 1.0f / (1.0f + ::expf(-x));
  float s = R(x / (1.0f + ::expf(-x)));
  du = static_cast<T>(d * s);
  float ds = R(d * static_cast<float>(u));
  dg = static_cast<T>(ds * sig * (1.0f + x * (1.0f - sig)));
}"""
# Rotary embedding, HF's `x * cos + rotate_half(x) * sin` with rotate_half(x) = [-x2, x1] (x's halves swapped, the
# first negated), one element each: `x` is the element, `a`/`b` are the first/second half's element at its offset
# (broadcast over the halves), `sg` -1 in the first half and +1 in the second. The same kernel computes the
# backward with sin replaced by its halves swapped and negated (rotate_half's transpose is its negative).
_ROPE = """
template <typename T> T rope(T x, T a, T b, T c, T s, T sg) {
  auto R = [](float v) { return ROUND; };
  float sign = static_cast<float>(sg);
  float other = static_cast<float>(sign < 0.0f ? b : a);
  // (__fmul_rn/__fadd_rn: never contracted into an fma, which would round once where eager torch rounds twice)
  return static_cast<T>(__fadd_rn(R(__fmul_rn(static_cast<float>(x), static_cast<float>(c))),
                                  R(__fmul_rn(sign * other, static_cast<float>(s)))));
}"""
_ROUND = {
    torch.float32: "v",
    torch.bfloat16: ("isfinite(v) ? __uint_as_float((__float_as_uint(v) + 0x7fffu + ((__float_as_uint(v) >> 16) & 1u))"
                     " & 0xffff0000u) : v"),
}


def _jitted(dtype: torch.dtype):
    _wait_for_compiler()
    return _make_jitted(dtype)


@functools.cache
def _make_jitted(dtype: torch.dtype):
    from torch.cuda.jiterator import _create_jit_fn, _create_multi_output_jit_fn

    r = _ROUND[dtype]
    return (_create_jit_fn(_SILU_MUL.replace("ROUND", r)),
            _create_multi_output_jit_fn(_SILU_MUL_BACKWARD.replace("ROUND", r), num_outputs=2),
            _create_jit_fn(_ROPE.replace("ROUND", r)))


_COMPILER: Optional[threading.Thread] = None  # compile_in_background's thread, until waited for


def compile_in_background(device: torch.device, dtype: torch.dtype) -> None:
    """Starts a thread that compiles (NVRTC) the kernels below for `dtype` while this process goes on loading the
    model and reading the first batch. Why: each kernel is compiled at its first call (~0.2-0.5 s each where
    torch's kernel disk cache does not have it), which would otherwise happen in the first training step or
    labeling batch with the GPU idle. The compiler holds the GIL, so it overlaps only what runs without it (CUDA
    work, file reads, waiting for the DataLoader's workers). The first kernel call here waits for the thread.
    Nothing happens off CUDA or for other dtypes; if the thread fails, the kernels are compiled at first use."""
    global _COMPILER
    if _COMPILER is None and dtype in _ROUND and device.type == "cuda":
        _COMPILER = threading.Thread(target=_compile_all, args=(device, dtype), name="finllm-kernels", daemon=True)
        _COMPILER.start()


def _wait_for_compiler() -> None:
    global _COMPILER
    thread = _COMPILER
    if thread is not None and thread is not threading.current_thread():
        thread.join()
        _COMPILER = None


def _compile_all(device: torch.device, dtype: torch.dtype) -> None:
    """Runs each kernel once as the fast paths call it: silu_mul's forward and backward on contiguous tensors
    (their vectorized kernels), the rotary embedding on a q view of a q/k/v output (its backward runs the same
    kernel). Not through autograd: its worker thread would wait for this one (_jitted) while this one waits for
    the backward."""
    try:
        with torch.cuda.device(device):
            silu_fwd, silu_bwd, _ = _make_jitted(dtype)
            g = torch.randn(64, 64, device=device, dtype=dtype)
            silu_fwd(g, g)
            silu_bwd(g, g, g)
            q = torch.randn(1, 3, 4, 8, device=device, dtype=dtype).transpose(1, 2)
            cos = torch.randn(1, 1, 3, 8, device=device, dtype=dtype)
            _rope(q, cos, cos)
            torch.cuda.synchronize(device)
    except Exception:  # (compiled at first use then, as without this thread)
        pass


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return _jitted(g.dtype)[0](g, u)

    @staticmethod
    def backward(ctx, dp: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du = _jitted(g.dtype)[1](dp, g, u)
        return dg, du


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`F.silu(g) * u`: one kernel each way on CUDA for bf16 or fp32 tensors of one dtype and shape."""
    if g.is_cuda and g.dtype == u.dtype and g.dtype in _ROUND and g.shape == u.shape:
        return _SiluMul.apply(g, u)
    return F.silu(g) * u


ROPE = "apply_rotary_pos_emb"  # the function HF's attention layers (Llama, Qwen2, Mistral, ...) call by this name


_SIGNS: dict[tuple, torch.Tensor] = {}


def _signs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[[-1], [1]]: the rotation's sign in each half (made once per device and dtype; while a CUDA graph is being
    captured, made by kernels the graph records, as a copy from the host cannot be captured)."""
    key = (device, dtype)
    if key in _SIGNS:
        return _SIGNS[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.ones(2, 1, device=device, dtype=dtype).cumsum(0).mul_(2).sub_(3)
    return _SIGNS.setdefault(key, torch.tensor([[-1.0], [1.0]], dtype=dtype).to(device))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` (cos and sin broadcastable to x), rounded as eager torch rounds it: on CUDA
    one kernel (_ROPE), elsewhere eager torch in the kernel's order."""
    halves = x.unflatten(-1, (2, -1))  # [..., 2, D/2]
    sign = _signs(x.device, x.dtype)
    if not x.is_cuda:
        return x * cos + (halves.flip(-2) * sign).flatten(-2) * sin
    c, s = (t.unflatten(-1, (2, -1)) for t in (cos, sin))
    return _jitted(x.dtype)[2](halves, halves[..., :1, :], halves[..., 1:, :], c, s, sign).flatten(-2)


class _Rope(torch.autograd.Function):
    """q and k rotated; backward: the transposed rotation, `g * cos - rotate_half(g * sin)`, the same kernel with
    sin's halves swapped and negated (as autograd rounds it: each product, then the sum)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        back = -sin.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
        return _rope(gq, cos, back), _rope(gk, cos, back), None, None


def _rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (len({t.dtype for t in (q, k, cos, sin)}) == 1 and q.dtype in _ROUND and d % 2 == 0
            and k.shape[-1] == cos.shape[-1] == sin.shape[-1] == d and not (cos.requires_grad or sin.requires_grad))


@functools.cache
def _fused_rope(original):
    """`original` (a model file's apply_rotary_pos_emb) computed as _Rope where the tensors fit; as itself else.
    (Made once per function: the attention layers ask for it at every call.)"""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or set(kwargs) - {"unsqueeze_dim"} or not _rope_fits(q, k, cos, sin):
            return original(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", 1)
        return _Rope.apply(q, k, cos.unsqueeze(dim), sin.unsqueeze(dim))
    return apply_rotary_pos_emb


def _attention_forward(self, *args, **kwargs):
    """The attention class's own forward, with its model file's apply_rotary_pos_emb swapped for the fused one
    while it runs (the forward looks the function up in the file's globals at every call); without gradients
    (label scoring), its attention registry too, for one that folds grouped query heads (attention.py)."""
    namespace = sys.modules[type(self).__module__].__dict__
    swaps = {ROPE: _fused_rope(namespace[ROPE])}
    if REGISTRY in namespace and not torch.is_grad_enabled():
        swaps[REGISTRY] = FoldedAttention(namespace[REGISTRY])
    originals = {name: namespace[name] for name in swaps}
    namespace.update(swaps)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        namespace.update(originals)


def _eps(m: torch.nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps"):
        value = getattr(m, name, None)
        if isinstance(value, float):
            return value
    return None


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != self.weight.dtype:  # (HF's returns the promoted dtype; F.rms_norm wants one dtype)
        return type(self).forward(self, x)
    # not under autocast: CUDA's lists rms_norm among its fp32 ops (an fp32 output, so casts and fp32 activations
    # after every norm), where HF's norm returns the input's dtype (tests/test_gpu.py checks it)
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, self.weight.shape, self.weight, _eps(self))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


# The probes' tensors, whatever the default device and dtype are (Lightning loads the model under its device as
# the default: a probe made there with a CPU generator fails, and every module kept its own forward)
_CPU32 = {"device": "cpu", "dtype": torch.float32}


@functools.cache
def rms_norm_class(cls: type, eps_name: str) -> bool:
    """Whether `cls.forward` computes `F.rms_norm(x, weight, eps)` (Llama, Qwen2, Mistral, ...; not e.g. Gemma's
    `(1 + weight)`), tried on a random 8-wide weight (CPU, fp32)."""
    try:
        probe = cls.__new__(cls)
        torch.nn.Module.__init__(probe)
        gen = torch.Generator().manual_seed(0)
        probe.weight = torch.nn.Parameter(torch.randn(8, generator=gen, **_CPU32))
        setattr(probe, eps_name, 1e-5)
        x = torch.randn(3, 8, generator=gen, **_CPU32) * 3
        with torch.no_grad():
            out = cls.forward(probe, x)
            return torch.allclose(out, F.rms_norm(x, (8,), probe.weight, 1e-5), rtol=1e-5, atol=1e-6)
    except Exception:  # any other forward (other attributes, other math): not this route
        return False


def silu_gated_mlp_class(cls: type, act: torch.nn.Module) -> bool:
    """Whether `cls.forward` with this activation module computes `down(silu(gate(x)) * up(x))`, tried on tiny
    random projections (CPU; an activation with weights of its own on another device fails it)."""
    try:
        gen = torch.Generator().manual_seed(0)
        probe = cls.__new__(cls)
        torch.nn.Module.__init__(probe)
        for name, (i, o) in {"gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}.items():
            lin = torch.nn.Linear(i, o, bias=False, **_CPU32)
            lin.weight.data = torch.randn(o, i, generator=gen, **_CPU32)
            setattr(probe, name, lin)
        probe.act_fn = act
        x = torch.randn(3, 8, generator=gen, **_CPU32)
        with torch.no_grad():
            ref = probe.down_proj(F.silu(probe.gate_proj(x)) * probe.up_proj(x))
            return torch.allclose(cls.forward(probe, x), ref, rtol=1e-5, atol=1e-6)
    except Exception:  # any other forward (other attributes, other math): not this route
        return False


@functools.cache
def rope_attention_class(cls: type) -> bool:
    """Whether `cls.forward` calls its model file's `apply_rotary_pos_emb(q, k, cos, sin)` and that function computes
    `x * cos + rotate_half(x) * sin` for q and k (tried on random CPU fp32 tensors; not e.g. an interleaved or a
    partial rotary embedding)."""
    fn = getattr(sys.modules.get(cls.__module__), ROPE, None)
    if not callable(fn) or ROPE not in inspect.unwrap(cls.forward).__code__.co_names:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        q, k = torch.randn(1, 2, 3, 8, generator=gen, **_CPU32), torch.randn(1, 1, 3, 8, generator=gen, **_CPU32)
        cos, sin = torch.randn(1, 3, 8, generator=gen, **_CPU32), torch.randn(1, 3, 8, generator=gen, **_CPU32)

        def ref(x):
            return x * cos[:, None] + torch.cat([-x[..., 4:], x[..., :4]], -1) * sin[:, None]
        with torch.no_grad():
            qe, ke = fn(q, k, cos, sin)
            return torch.allclose(qe, ref(q), rtol=1e-5, atol=1e-6) and torch.allclose(ke, ref(k), rtol=1e-5, atol=1e-6)
    except Exception:  # another signature or other math: not this route
        return False


def fused_layer_forwards(decoder) -> dict[torch.nn.Module, Any]:
    """Forwards for each decoder layer's RMSNorms (and the final norm), SiLU-gated MLP and rotary attention whose
    class passes the probe; other modules are left out (model.compile_layers may compile the norms and MLPs)."""
    out: dict[torch.nn.Module, Any] = {}
    modules = [m for layer in decoder.layers for m in layer.modules()] + [getattr(decoder, "norm", None)]
    for m in modules:
        if m is None or m in out:
            continue
        weight, eps = getattr(m, "weight", None), _eps(m)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 1 and eps is not None
                and rms_norm_class(type(m), "variance_epsilon" if hasattr(m, "variance_epsilon") else "eps")):
            out[m] = types.MethodType(_norm_forward, m)
        elif (all(isinstance(getattr(m, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
              and isinstance(getattr(m, "act_fn", None), torch.nn.Module) and silu_gated_mlp_class(type(m), m.act_fn)):
            out[m] = types.MethodType(_mlp_forward, m)
        elif all(isinstance(getattr(m, n, None), torch.nn.Module) for n in ("q_proj", "k_proj")) and \
                rope_attention_class(type(m)):
            out[m] = types.MethodType(_attention_forward, m)
    return out

