"""The attention's LoRA linears of the 1.5B model, peft's forwards vs finllm_pl/fused.py's, and the MLP's gate/up
as two matmuls vs one: forward + backward of 28 layers replayed from a CUDA graph (as the training step runs them),
milliseconds per step. GPU only.

Layers: q/k/v/o of DeepSeek-R1-Distill-Qwen-1.5B's shapes (hidden 1,536, k/v 256, q/k/v biased) as peft LoRA
r=4 layers over bf16 base weights (dequantize_once), LoRA dropout 0.05, the adapter in bf16 (the step's cast-once);
between q/k/v and o a stand-in for attention (q plus k and v tiled), so the gradients flow through all four. The
MLP (intermediate 8,960) torch.compile'd either way, as model.compile_layers runs it. Two experiments swap
fused.py's `lora_hidden` (dropout + A) for a torch.compile'd one: as a reduction (inductor's RNG in the same
kernel) or as the same bmm. Prints a table and writes JSON.

    python benchmarks/lora_kernels.py --tokens 1800,3600 --out results/gpu/lora_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import finllm_pl.fused as fused_py  # noqa: E402
from finllm_pl.fused import fused_forwards, lora_hidden  # noqa: E402
from finllm_pl.graphs import fast_modules  # noqa: E402

H, KV, INTER, LAYERS = 1536, 256, 8960, 28


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(H, n, bias=True) for n in (H, KV, KV))
        self.o_proj = torch.nn.Linear(H, H, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(q + torch.cat([k, v] * (H // (2 * KV)), -1))


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.ModuleList(Attention() for _ in range(LAYERS))
        self.gate_up = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(2 * INTER, H) * 0.02, requires_grad=False)
                                              for _ in range(LAYERS))
        self.down = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(H, INTER) * 0.02, requires_grad=False)
                                           for _ in range(LAYERS))


@torch.compile(dynamic=True)
def mlp_two(x, gate_up, down):  # gate and up as two matmuls (the model's own MLP)
    gate, up = gate_up.split(INTER)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@torch.compile(dynamic=True)
def mlp_one(x, gate_up, down):  # gate and up as one matmul, its output split
    g, u = F.linear(x, gate_up).chunk(2, -1)
    return F.linear(F.silu(g) * u, down)


@torch.compile(dynamic=True)
def hidden_reduction(x2, As, p: float):  # experiment: dropout + A as one reduction kernel (inductor's RNG)
    A3 = torch.stack(As)  # [n, r, H]
    dropped = F.dropout(x2.expand(len(As), *x2.shape), p, training=True)
    h = (dropped[:, :, None, :] * A3[:, None, :, :]).sum(-1, dtype=torch.float32).to(x2.dtype)  # [n, T, r]
    return h.transpose(0, 1).reshape(x2.shape[0], -1)


@torch.compile(dynamic=True)
def hidden_bmm(x2, As, p: float):  # experiment: the same ops as fused.py, compiled
    dropped = F.dropout(x2.expand(len(As), *x2.shape), p, training=True)
    return torch.bmm(dropped, torch.stack(As).transpose(1, 2)).transpose(0, 1).reshape(x2.shape[0], -1)


def step(model, x, attn: bool, mlp):
    h = x
    for i in range(LAYERS):
        if attn:
            h = h + model.attn[i](h)
        if mlp is not None:
            h = h + mlp(h, model.gate_up[i], model.down[i])
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(h.float().square().mean(), params + [x], allow_unused=True)  # (MLP alone: no LoRA)


def time_graph(fn, repeats: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, makes the library handles
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    del out, graph
    return (time.perf_counter() - t) / repeats * 1e3


def main(argv=None) -> int:
    from peft import LoraConfig, get_peft_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1800,3600", help="tokens per step (the fast config: ~1,800)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="results/gpu/lora_kernels.json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    base = Layers()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model = model.to("cuda", torch.bfloat16).train()
    fused = fused_forwards(model)
    assert len(fused) == 4 * LAYERS
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    variants = {"attention, peft": (True, None, {}), "attention, fused.py": (True, None, fused),
                "MLP, gate/up two matmuls": (False, mlp_two, {}), "MLP, gate/up one matmul": (False, mlp_one, {}),
                "both, peft + two": (True, mlp_two, {}), "both, fused.py + two": (True, mlp_two, fused),
                "attention, fused.py, A reduction compiled": (True, None, fused),
                "attention, fused.py, A bmm compiled": (True, None, fused)}
    for tokens in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for name, (attn, mlp, forwards) in variants.items():
            fused_py.lora_hidden = {"attention, fused.py, A reduction compiled": hidden_reduction,
                                    "attention, fused.py, A bmm compiled": hidden_bmm}.get(name, lora_hidden)

            def fn():
                with fast_modules(model, forwards, uncast_lora_input=True, skip_cudnn_attention=False):
                    return step(model, x, attn, mlp)
            ms = time_graph(fn, a.repeats)
            results["runs"].append({"variant": name, "tokens": tokens, "ms_per_step": ms})
            print(f"{name}: {ms:.2f} ms at {tokens} tokens", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    lines = ["| variant | tokens | ms per step (28 layers, fwd + bwd) |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tokens']} | {r['ms_per_step']:.2f} |" for r in results["runs"]]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
