"""The rotary embedding of q and k, HF's eager `apply_rotary_pos_emb` against finllm_pl/kernels.py's fused kernel,
on the 1.5B model's heads (12 query, 2 key/value, head size 128) as its attention layers see them: views of one
q/k/v matmul's output. Times the first call of each variant (NVRTC compiling jiterator's kernel, in a new process
with an empty PYTORCH_KERNEL_CACHE_PATH) and, per call, the forward and forward + backward (CUDA events, bf16).

    PYTORCH_KERNEL_CACHE_PATH=$(mktemp -d) python benchmarks/rope_kernel.py --out results/gpu/rope_kernel.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb  # noqa: E402

from finllm_pl.kernels import _fused_rope  # noqa: E402

# (rows, tokens per row, cos/sin rows): the packed training step's one sequence, labeling batches
SHAPES = {"train_packed": (1, 2600, 1), "label_512x40": (512, 40, 512), "label_1024x24": (1024, 24, 1024)}


def inputs(rows: int, tokens: int, cos_rows: int, dtype=torch.bfloat16):
    qkv = torch.randn(rows, tokens, 16 * 128, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.arange(tokens, device="cuda").expand(cos_rows, -1)[..., None] * torch.rand(64, device="cuda")
    cos, sin = (torch.cat([f(pos), f(pos)], -1).to(dtype) for f in (torch.cos, torch.sin))
    return qkv, cos, sin


def call(fn, qkv, cos, sin, backward: bool):
    rows, tokens = qkv.shape[:2]
    q, k, _ = qkv.view(rows, tokens, 16, 128).transpose(1, 2).split([12, 2, 2], 1)
    out = fn(q, k, cos, sin)
    if backward:
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    return out


def per_call_ms(fn, args, backward: bool, n: int = 50) -> float:
    for _ in range(3):
        call(fn, *args, backward)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        call(fn, *args, backward)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


_HALVES = """
template <typename T> void rope_halves(T x1, T x2, T c1, T c2, T s1, T s2, T& o1, T& o2) {
  auto R = [](float v) { return ROUND; };
  o1 = static_cast<T>(__fadd_rn(R(__fmul_rn(float(x1), float(c1))), R(__fmul_rn(-float(x2), float(s1)))));
  o2 = static_cast<T>(__fadd_rn(R(__fmul_rn(float(x2), float(c2))), R(__fmul_rn(float(x1), float(s2)))));
}"""


def halves_forward():
    """An alternative (forward only, not in finllm_pl): a two-output kernel over the halves, then a cat."""
    from torch.cuda.jiterator import _create_multi_output_jit_fn

    from finllm_pl.kernels import _ROUND

    fn = _create_multi_output_jit_fn(_HALVES.replace("ROUND", _ROUND[torch.bfloat16]), num_outputs=2)

    def rope(q, k, cos, sin):
        (c1, c2), (s1, s2) = (t.unsqueeze(1).chunk(2, -1) for t in (cos, sin))
        return tuple(torch.cat(fn(*x.chunk(2, -1), c1, c2, s1, s2), -1) for x in (q, k))
    return rope


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu/rope_kernel.json")
    a = ap.parse_args(argv)
    variants = {"eager": apply_rotary_pos_emb, "fused": _fused_rope(apply_rotary_pos_emb), "halves": halves_forward()}
    torch.zeros(1, device="cuda")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "first_calls": [], "runs": []}
    for name, fn in variants.items():  # first calls: the fused one compiles its kernel (forward, then backward)
        for shape, dims in SHAPES.items():
            for backward in (False, True) if name != "halves" else (False,):
                args = inputs(*dims)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                call(fn, *args, backward)
                torch.cuda.synchronize()
                results["first_calls"].append({"variant": name, "shape": shape, "backward": backward,
                                               "s": round(time.perf_counter() - t0, 4)})
    rows = ["| shape | variant | forward ms | forward + backward ms | forward bit for bit eager |", "|---|---|---|---|---|"]
    for shape, dims in SHAPES.items():
        args = inputs(*dims)
        with torch.no_grad():
            ref = call(apply_rotary_pos_emb, *args, False)
        for name, fn in variants.items():
            with torch.no_grad():
                equal = all(torch.equal(a, b) for a, b in zip(call(fn, *args, False), ref))
            fwd = per_call_ms(fn, args, False)
            both = per_call_ms(fn, args, True) if name != "halves" else float("nan")
            results["runs"].append({"shape": shape, "variant": name, "forward_ms": fwd, "fwd_bwd_ms": both,
                                    "forward_equals_eager": equal})
            rows.append(f"| {shape} | {name} | {fwd:.4f} | {both:.4f} | {equal} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results["first_calls"]))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
