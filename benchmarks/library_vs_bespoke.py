"""The bespoke parts of the fast backend against what a library does, on an H100-class GPU, in one call.

Each variant runs in its own process with empty inductor, Triton and NVRTC caches (as on a machine that never
compiled before), and reports its first call (compiling, JIT, capture) and its steady cost (median of many runs):

layers: 28 layers' RMSNorms + SiLU-gated MLPs and the attention's rotary embedding of the 1.5B model's shapes
    (hidden 1,536, MLP 8,960, 12 + 2 heads of 128, bf16, 2,592 tokens as in a packed training step), forward + input
    backward, replayed from a CUDA graph:
      eager      HF's modules as they are
      bespoke    backend/kernels.py: torch's fused rms_norm, jiterator SiLU-mul and rotary kernels
      compile    torch.compile of each module class's forward (and of the rotary function)
      liger      Liger-Kernel's Triton RMSNorm, SiLU-mul and rotary kernels (`pip install liger-kernel`)
step: the training step of the fast backend on the 1.5B shape (NF4 dequantized, LoRA r 4 on q/k/v/o, micro-batch
    32 of the sentiment set, shared prefix packed), over --shapes length buckets, forward + backward:
      graphs     backend/static.py's hand-made CUDA graphs (one per shape, the first checked against its eager step)
      compile    torch.compile(mode="reduce-overhead") of the same static step (fixed shapes: one graph per bucket)
    per-step ms in steady state, the first call of each shape, and the loss against the eager step.

    python benchmarks/library_vs_bespoke.py --tokenizer DIR --data instruction_formatted_data.jsonl --out results/gpu/library_vs_bespoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
T, H, I, L, HEADS, KV, D = 2592, 1536, 8960, 28, 12, 2, 128


def timed(fn, n: int = 30) -> tuple[float, list[float]]:
    """(first call s, steady ms per call: median over n, after 3 more)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(3):
        fn()
    ms = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return first, ms


# -- layers --------------------------------------------------------------------------------------------------------
def layers(variant: str) -> dict:
    import torch
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Config, Qwen2MLP, Qwen2RMSNorm

    cfg = Qwen2Config(hidden_size=H, intermediate_size=I, rms_norm_eps=1e-6, hidden_act="silu")
    torch.manual_seed(0)
    rope = modeling_qwen2.apply_rotary_pos_emb
    rope = getattr(rope, "original", rope)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = Qwen2RMSNorm(H, 1e-6), Qwen2RMSNorm(H, 1e-6)
            self.mlp = Qwen2MLP(cfg)
            self.qkv = torch.nn.Linear(H, (HEADS + 2 * KV) * D, bias=False)

    dec = torch.nn.Module()
    dec.layers = torch.nn.ModuleList(Layer() for _ in range(L))
    dec = dec.cuda().to(torch.bfloat16).requires_grad_(False)
    for layer in dec.layers:
        layer.input_layernorm.weight.data.normal_(1, 0.1)
    forwards, apply_rope = {}, rope
    if variant == "bespoke":
        from finllm_pl.backend.kernels import RopeDispatch, fused_rope, layer_forwards

        forwards, _ = layer_forwards(dec)
        dispatch = RopeDispatch(rope)

        def apply_rope(*a):
            with fused_rope():
                return dispatch(*a)
    elif variant == "compile":
        by_class = {}
        for layer in dec.layers:
            for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                by_class.setdefault(type(m), torch.compile(type(m).forward, dynamic=False))
                forwards[m] = types.MethodType(by_class[type(m)], m)
        apply_rope = torch.compile(rope, dynamic=False)
    elif variant == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        def norm(self, x):
            return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)

        def mlp(self, x):
            return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

        for layer in dec.layers:
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                forwards[n] = types.MethodType(norm, n)
            forwards[layer.mlp] = types.MethodType(mlp, layer.mlp)

        def apply_rope(q, k, cos, sin):
            return LigerRopeFunction.apply(q, k, cos, sin)
    for m, f in forwards.items():
        m.forward = f
    pos = torch.arange(T, device="cuda")[None, :, None] * torch.rand(D // 2, device="cuda")
    cos, sin = (torch.cat([f(pos), f(pos)], -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))

    def step(x):
        h = x
        for layer in dec.layers:
            a = layer.input_layernorm(h)
            q, k, _ = layer.qkv(a).view(1, T, HEADS + 2 * KV, D).transpose(1, 2).split([HEADS, KV, KV], 1)
            q, k = apply_rope(q, k, cos, sin)
            h = h + (q.sum(1) + k.sum(1)).transpose(0, 1).reshape(1, T, D).repeat(1, 1, H // D) * 0.01
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return torch.autograd.grad(h.float().pow(2).mean(), x)[0]

    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    first, _ = timed(lambda: step(x), n=1)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = step(x)
    _, ms = timed(graph.replay, n=50)
    return {"first_call_s": round(first, 3), "steady_ms": round(statistics.median(ms), 3),
            "grad_norm": float(out.float().norm())}


# -- the training step -----------------------------------------------------------------------------------------------
def step(variant: str, tokenizer: str, data: str, shapes: int) -> dict:
    import torch

    from finllm_pl import model as hf
    from finllm_pl.assets import build_random_qwen_1_5b
    from finllm_pl.backend import FastBackend
    from finllm_pl.backend.plain import decoder_call
    from finllm_pl.backend.static import StaticCollate, static_loss
    from finllm_pl.prompts import DEFAULT_INSTRUCTION, PromptFormatter

    tmp = tempfile.mkdtemp(prefix="finllm_lvb_")
    folder = build_random_qwen_1_5b(Path(tmp) / "qwen", tokenizer)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    model = hf.build(str(folder), "nf4", torch.bfloat16, torch.device("cuda"), None, False, lora, dequantize=True)
    components = ["sparse_head", "static_step", "lora_groups", "kernels"] + (["cuda_graphs"] if variant == "graphs"
                                                                               else [])
    backend = FastBackend(model, torch.bfloat16, components if variant == "graphs" else ["sparse_head",
                                                                                          "static_step"])
    # micro-batches of 32 rows of the set, at `shapes` different lengths (the shortest, a middle and the longest)
    f = PromptFormatter(hf.load_tokenizer(tokenizer))
    rows = []
    for line in open(data):
        r = json.loads(line)
        ids, labels, _, _ = f.encode_example(r["instruction"], r.get("input", ""), r["output"], 512)
        rows.append({"input_ids": ids, "labels": labels})
        if len(rows) == 4096:
            break
    rows.sort(key=lambda r: len(r["input_ids"]))
    collate = StaticCollate(f.tokenizer.pad_token_id, 8, 32)
    picks = [round(i * (len(rows) - 32) / max(shapes - 1, 1)) for i in range(shapes)]
    batches = [{k: v.cuda() for k, v in collate(rows[p:p + 32]).items() if k.startswith("g_")} for p in picks]
    params = [p for p in model.parameters() if p.requires_grad]
    head = backend.head

    def eager_loss(st):
        with backend._step_modules():
            return static_loss(head, st, decoder_call)

    ref = []
    for st in batches:
        loss, n = eager_loss(st)
        ref.append(float(loss) / float(n))
    if variant == "graphs":
        def run(st):
            for p in params:
                p.grad = None
            return backend.step(st)
    else:
        compiled = torch.compile(lambda st: static_loss(head, st, decoder_call), mode="reduce-overhead", dynamic=False)

        def run(st):
            for p in params:
                p.grad = None
            with backend._step_modules():
                loss, n = compiled(st)
            loss.backward()
            return loss.detach(), n
    out = {"shapes": [list(b["g_mask"].shape) for b in batches], "first_call_s": [], "steady_ms": [], "loss_diff": []}
    for st, r in zip(batches, ref):
        first, ms = timed(lambda: run(st), n=20)
        loss, n = run(st)
        out["first_call_s"].append(round(first, 3))
        out["steady_ms"].append(round(statistics.median(ms), 3))
        out["loss_diff"].append(abs(float(loss) / float(n) - r))
    out["mean_steady_ms"] = round(statistics.mean(out["steady_ms"]), 3)
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", default="eager,bespoke,compile,liger", help="layer variants (comma list, or none)")
    ap.add_argument("--step", default="graphs,compile", help="training step variants (comma list, or none)")
    ap.add_argument("--shapes", type=int, default=3, help="length buckets of the training step")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant (a compile that never ends)")
    ap.add_argument("--out", default="results/gpu/library_vs_bespoke.json")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        part, variant = a.one
        res = layers(variant) if part == "layers" else step(variant, a.tokenizer, a.data, a.shapes)
        print("RESULT " + json.dumps(res))
        return 0
    results = {"argv": sys.argv[1:], "layers": {}, "step": {}}
    for part, variants in (("layers", a.layers), ("step", a.step)):
        for v in [x for x in variants.split(",") if x and x != "none"]:
            caches = tempfile.mkdtemp(prefix="finllm_caches_")
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor", TRITON_CACHE_DIR=f"{caches}/triton",
                       PYTORCH_KERNEL_CACHE_PATH=f"{caches}/nvrtc")
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, "--tokenizer", a.tokenizer, "--data", a.data, "--shapes",
                                    str(a.shapes), "--one", part, v], env=env, capture_output=True, text=True,
                                   timeout=a.timeout)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                r = json.loads(line[-1][7:]) if line else {"error": (p.stderr or p.stdout)[-3000:]}
            except subprocess.TimeoutExpired:
                r = {"error": f"over {a.timeout:.0f} s (killed)"}
            r["process_s"] = round(time.perf_counter() - t0, 1)
            results[part][v] = r
            print(part, v, json.dumps({k: r[k] for k in r if k != "error"}), r.get("error", "")[-800:], flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1))
    lines = ["| layers (28 x norms + MLP + rotary, fwd + bwd) | first call s | steady ms | process s |", "|---|---|---|---|"]
    for v, r in results["layers"].items():
        lines.append(f"| {v} | {r.get('first_call_s', '-')} | {r.get('steady_ms', r.get('error', '-')[:60])} | "
                     f"{r['process_s']} |")
    lines += ["", "| training step (1.5B, micro 32) | first call s per shape | steady ms per shape | mean ms | "
                  "|loss - eager| |", "|---|---|---|---|---|"]
    for v, r in results["step"].items():
        if "error" in r:
            lines.append(f"| {v} | error: {r['error'].splitlines()[-1][:100] if r['error'] else '?'} | | | |")
        else:
            lines.append(f"| {v} | {r['first_call_s']} | {r['steady_ms']} | {r['mean_steady_ms']} | "
                         f"{max(r['loss_diff']):.2e} |")
    results["table"] = lines
    Path(a.out).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
