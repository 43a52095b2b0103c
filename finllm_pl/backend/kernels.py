"""The decoder layers' norms, gated MLPs and rotary embeddings in fused kernels that need no compiling (fast component
`kernels`; plain torch).

Why: written as HF writes them, an RMSNorm is ~8 elementwise kernels forward and more backward (fp32 casts, square,
mean, rsqrt, two products), a gated MLP's `act(gate) * up` two kernels forward and three backward, the rotary
embedding `q * cos + rotate_half(q) * sin` ~10 forward and ~18 backward per layer, each reading or writing a whole
tensor. torch.compile fuses them too, but costs seconds of compiling in every new process; these are compiled by
NVRTC in a fraction of a second (at their first call, in the backend's self-check on a stand-in, before the model
loads). docs/performance.md has the measurements against torch.compile and Liger-Kernel.
- An RMSNorm runs as torch's own `F.rms_norm`, one fused kernel on CUDA, forward and backward. It rounds once
  (normalise and scale in fp32) where HF rounds the normalised value before scaling: at most ~1 bf16 ulp apart.
- A SiLU-gated MLP's `silu(gate) * up` is one elementwise kernel forward and one (two outputs) backward (torch's
  jiterator), rounded as eager torch rounds it.
- The rotary embedding is one kernel per tensor each way, bit for bit HF's. HF's attention layers call their model
  file's `apply_rotary_pos_emb`; `install_rope` puts a dispatcher in its place once, which runs the fused kernel
  only in a thread that asked for it (`fused_rope()`, entered by the fast backend around its forwards) and HF's own
  function everywhere else: another thread, or another model in this process, is not affected.
A module takes this route only if its class computes the same thing: its forward is run once on tiny random
weights (CPU, fp32) against the formula (`rms_norm_class`, `silu_gated_mlp_class`, `rope_attention_class`); the
backend's self-check then compares the whole model against the plain path. Off CUDA, or in other dtypes, the gated
product and the rotary embedding run as eager torch (the rotary embedding in the kernel's order: the same bits).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import threading
import types
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

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


@functools.cache
def _jitted(dtype: torch.dtype):
    """The three kernels for `dtype` (NVRTC compiles each at its first call; functools.cache keeps the compiled
    functions, as torch keeps its own kernels)."""
    from torch.cuda.jiterator import _create_jit_fn, _create_multi_output_jit_fn

    r = _ROUND[dtype]
    return (_create_jit_fn(_SILU_MUL.replace("ROUND", r)),
            _create_multi_output_jit_fn(_SILU_MUL_BACKWARD.replace("ROUND", r), num_outputs=2),
            _create_jit_fn(_ROPE.replace("ROUND", r)))


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


def signs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[[-1], [1]]: the rotation's sign in each half. Made by kernels, not copied from the host: a copy from the host
    cannot be captured in a CUDA graph (RopeDispatch keeps one per device and dtype outside a capture)."""
    return torch.ones(2, 1, device=device, dtype=dtype).cumsum(0).mul_(2).sub_(3)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` (cos and sin broadcastable to x), rounded as eager torch rounds it: on CUDA
    one kernel (_ROPE), elsewhere eager torch in the kernel's order."""
    halves = x.unflatten(-1, (2, -1))  # [..., 2, D/2]
    if not x.is_cuda:
        return x * cos + (halves.flip(-2) * sign).flatten(-2) * sin
    c, s = (t.unflatten(-1, (2, -1)) for t in (cos, sin))
    return _jitted(x.dtype)[2](halves, halves[..., :1, :], halves[..., 1:, :], c, s, sign).flatten(-2)


class _Rope(torch.autograd.Function):
    """q and k rotated; backward: the transposed rotation, `g * cos - rotate_half(g * sin)`, the same kernel with
    sin's halves swapped and negated (as autograd rounds it: each product, then the sum)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, sign):
        ctx.save_for_backward(cos, sin, sign)
        return _rope(q, cos, sin, sign), _rope(k, cos, sin, sign)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin, sign = ctx.saved_tensors
        back = -sin.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
        return _rope(gq, cos, back, sign), _rope(gk, cos, back, sign), None, None, None


def _rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (len({t.dtype for t in (q, k, cos, sin)}) == 1 and q.dtype in _ROUND and d % 2 == 0
            and k.shape[-1] == cos.shape[-1] == sin.shape[-1] == d and not (cos.requires_grad or sin.requires_grad))


_FUSED_ROPE: contextvars.ContextVar[bool] = contextvars.ContextVar("finllm_fused_rope", default=False)


@contextlib.contextmanager
def fused_rope() -> Iterator[None]:
    """Within this block, in this thread, installed rotary dispatchers run the fused kernel."""
    token = _FUSED_ROPE.set(True)
    try:
        yield
    finally:
        _FUSED_ROPE.reset(token)


class RopeDispatch:
    """Stands in a model file for its `apply_rotary_pos_emb`: HF's function, or (inside `fused_rope()`, where the
    tensors fit) the fused kernel."""

    def __init__(self, original) -> None:
        self.original = original
        self.signs: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> signs(): a constant, made once
        functools.update_wrapper(self, original, updated=())

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if not _FUSED_ROPE.get() or args or set(kwargs) - {"unsqueeze_dim"} or not _rope_fits(q, k, cos, sin):
            return self.original(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", 1)
        key = (q.device, q.dtype)
        sign = self.signs.get(key)
        if sign is None:
            sign = signs(*key)
            if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):  # (a graph's memory is its own)
                self.signs[key] = sign
        return _Rope.apply(q, k, cos.unsqueeze(dim), sin.unsqueeze(dim), sign)


_INSTALL = threading.Lock()


def install_rope(cls: type) -> None:
    """Put a RopeDispatch in place of the attention class's model file's `apply_rotary_pos_emb` (once; it computes
    HF's function wherever fused_rope() is not entered)."""
    namespace = sys.modules[cls.__module__].__dict__
    with _INSTALL:
        if not isinstance(namespace[ROPE], RopeDispatch):
            namespace[ROPE] = RopeDispatch(namespace[ROPE])


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
    fn = fn.original if isinstance(fn, RopeDispatch) else fn
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


def layer_forwards(decoder) -> tuple[dict[torch.nn.Module, Any], list[torch.nn.Module]]:
    """({norm or MLP module: fused forward}, attention modules whose rotary embedding the fused kernel computes) for
    each decoder layer (and the final norm) whose class passes the probe; other modules are left out. The
    attention classes' model files get their RopeDispatch (install_rope)."""
    out: dict[torch.nn.Module, Any] = {}
    rope: list[torch.nn.Module] = []
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
            install_rope(type(m))
            rope.append(m)
    return out, rope
