"""The first call (compiling, JIT) and the steady cost of 28 layers' norms + MLP, forward + input backward, per
implementation, on the 1.5B model's shapes (hidden 1,536, MLP 8,960, bf16, 2,592 tokens; weights frozen as under
LoRA). Each variant runs in its own process with empty inductor, Triton and NVRTC (torch's kernel cache: jiterator)
caches; the steady cost is a CUDA graph's replay. Variants: eager (HF's modules), inductor (graphs.compiled_forwards: model.compile_layers), native
(kernels.fused_layer_forwards: model.fused_layers; also checks silu_mul against eager torch bit for bit), eager_rms
(F.rms_norm, eager MLP), liger / liger_norm_only (Liger-Kernel's Triton RMSNorm and SiLU-mul: needs
`pip install liger-kernel`, not a dependency of this project).

    python benchmarks/norm_mlp_first_call.py results/gpu/norm_mlp_first_call.json native,inductor,eager,liger
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T, H, I, L = 2592, 1536, 8960, 28


def run(variant):
    t_start = time.perf_counter()
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2MLP, Qwen2Config
    cfg = Qwen2Config(hidden_size=H, intermediate_size=I, rms_norm_eps=1e-6, hidden_act="silu")
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = Qwen2RMSNorm(H, 1e-6)
            self.post_attention_layernorm = Qwen2RMSNorm(H, 1e-6)
            self.mlp = Qwen2MLP(cfg)

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(L))

    dec = Dec().cuda().to(torch.bfloat16).requires_grad_(False)
    for layer in dec.layers:
        layer.input_layernorm.weight.data.normal_(1, 0.1)
    import_s = time.perf_counter() - t_start
    forwards = {}
    if variant == "inductor":
        from finllm_pl.graphs import compiled_forwards
        forwards = compiled_forwards(dec)
    elif variant.startswith("liger"):
        import types
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        def norm(self, x):
            return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)
        def mlp(self, x):
            return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))
        for layer in dec.layers:
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                forwards[n] = types.MethodType(norm, n)
            if variant == "liger":
                forwards[layer.mlp] = types.MethodType(mlp, layer.mlp)
    elif variant == "native":
        from finllm_pl.kernels import fused_layer_forwards, silu_mul
        forwards = fused_layer_forwards(dec)
        assert len(forwards) == 3 * L, len(forwards)
    elif variant == "eager_rms":
        import types
        import torch.nn.functional as F
        def norm(self, x):
            return F.rms_norm(x, (H,), self.weight, self.variance_epsilon)
        for layer in dec.layers:
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                forwards[n] = types.MethodType(norm, n)
    for m, f in forwards.items():
        m.forward = f

    def step(x):
        h = x
        for layer in dec.layers:
            a = layer.input_layernorm(h)
            h = h + a * 0.5  # stand-in for attention
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        loss = h.float().pow(2).mean()
        return torch.autograd.grad(loss, x)[0]

    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g_first = step(x)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(x)
    torch.cuda.synchronize()
    second_s = time.perf_counter() - t0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(g):
        out = step(x)
    capture_s = time.perf_counter() - t0
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1e3
    res = {"variant": variant, "import_build_s": round(import_s, 2), "first_call_s": round(first_s, 3),
           "second_call_s": round(second_s, 3), "capture_host_s": round(capture_s, 3), "graph_ms": round(ms, 3),
           "grad_norm": float(out.float().norm()), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if variant == "native":  # the jiterator kernel vs eager torch, bitwise
        import torch.nn.functional as F
        g, u, dp = (torch.randn(T, I, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(3))
        for dt in (torch.bfloat16, torch.float32, torch.float16):
            gg, uu, dd = (t.to(dt).requires_grad_() for t in (g, u, dp))
            ref = F.silu(gg) * uu
            rg, ru = torch.autograd.grad(ref, (gg, uu), dd)
            out = silu_mul(gg, uu)
            og, ou = torch.autograd.grad(out, (gg, uu), dd)
            res[f"silu_mul_{dt}"] = {"fwd_equal": bool(torch.equal(out, ref)), "dg_equal": bool(torch.equal(og, rg)),
                                     "du_equal": bool(torch.equal(ou, ru)),
                                     "fwd_maxdiff": float((out.float() - ref.float()).abs().max()),
                                     "dg_maxdiff": float((og.float() - rg.float()).abs().max())}
    if variant == "inductor":
        import torch._dynamo.utils as du
        res["compile_times"] = du.compile_times(repr="str", aggregate=True)
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        run(sys.argv[2])
        sys.exit()
    out = sys.argv[1]
    rows = []
    for v in sys.argv[2].split(","):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(), TRITON_CACHE_DIR=tempfile.mkdtemp(),
                   PYTORCH_KERNEL_CACHE_PATH=tempfile.mkdtemp())
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--one", v], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = [l for l in p.stdout.splitlines() if l.startswith("{")]
        r = json.loads(line[-1]) if line else {"variant": v, "error": p.stderr[-2000:]}
        r["process_wall_s"] = round(wall, 2)
        rows.append(r)
        print(json.dumps(r), flush=True)
    Path(out).write_text(json.dumps(rows, indent=1))
