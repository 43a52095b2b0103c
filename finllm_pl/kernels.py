"""The decoder layers' norms and gated MLPs in fused kernels that need no compiling (plain torch; the fast paths put
them in place through graphs.fast_modules).

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
A module takes this route only if its class computes the same thing: its forward is run once on tiny random
weights (CPU, fp32) against the formula (`rms_norm_class`, `silu_gated_mlp_class`). Off CUDA, or in other dtypes,
the gated product runs as eager torch.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Optional

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
_ROUND = {
    torch.float32: "v",
    torch.bfloat16: ("isfinite(v) ? __uint_as_float((__float_as_uint(v) + 0x7fffu + ((__float_as_uint(v) >> 16) & 1u))"
                     " & 0xffff0000u) : v"),
}


@functools.cache
def _jitted(dtype: torch.dtype):
    from torch.cuda.jiterator import _create_jit_fn, _create_multi_output_jit_fn

    r = _ROUND[dtype]
    return (_create_jit_fn(_SILU_MUL.replace("ROUND", r)),
            _create_multi_output_jit_fn(_SILU_MUL_BACKWARD.replace("ROUND", r), num_outputs=2))


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


def fused_layer_forwards(decoder) -> dict[torch.nn.Module, Any]:
    """Forwards for each decoder layer's RMSNorms (and the final norm) and SiLU-gated MLP whose class passes the
    probe; other modules are left out (model.compile_layers may compile them)."""
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
    return out

