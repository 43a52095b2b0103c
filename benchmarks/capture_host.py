"""Where the host time of a CUDA-graph capture of the training step goes (1.5B architecture, random bf16 weights,
LoRA r=4 q/k/v/o, fused_layers, static micro-batches of 32 rows with a 45-token shared prefix): the first shape
(eager warm-up + capture), an eager pass's host time, forward only, two captures of new shapes, and a cProfile of a
third (sorted by own and by cumulative time). On an H100 (2026-11-26): captures 0.22 s each; under cProfile the
autograd engine's backward 80 ms, the modules' forward 69 ms, graph instantiation 20 ms, peft's
disable_input_dtype_casting 17 ms, functional_call's tie search 13 ms. Making the last two cheaper (and capturing
later shapes without torch.cuda.graph's sync + empty_cache) changed nothing measurable in the epoch
(results/gpu/fit_epoch_capture_host_experiment.json).

    python benchmarks/capture_host.py > capture_host.txt

results/gpu/capture_host.txt is the output of call 8, from a draft of this script that printed the same
measurements under other keys.
"""
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from finllm_pl import model as hf  # noqa: E402
from finllm_pl.assets import QWEN_1_5B  # noqa: E402
from finllm_pl.data import static_batch  # noqa: E402
from finllm_pl.graphs import GraphedLossBackward  # noqa: E402


def batch(length: int, rows: int = 32, prefix: int = 45) -> dict[str, torch.Tensor]:
    """A static micro-batch (on the GPU) of `rows` rows: a shared `prefix`, then `length` tokens each."""
    gen = torch.Generator().manual_seed(length)
    head = torch.randint(100, 1000, (prefix,), generator=gen)
    ids = torch.cat([head.expand(rows, -1), torch.randint(100, 1000, (rows, length), generator=gen)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    st = static_batch(ids, torch.ones_like(ids), labels, shared_prefix=8, rows=rows)
    return {k: v.cuda() for k, v in st.items() if k.startswith("g_")}


def timed(fn) -> tuple[float, float]:
    """(host seconds until `fn` returns, seconds until the GPU is done too), from an idle GPU."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round(t1 - t0, 4), round(time.perf_counter() - t0, 4)


def main() -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**QWEN_1_5B), dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    model = hf.add_lora(model, 4, 8, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
    model.train()
    g = GraphedLossBackward(model, torch.bfloat16, use_graphs=True, fused_layers=True)
    res = {"first_shape_s": timed(lambda: g(batch(40)))[1]}  # eager warm-up + capture + replay
    st = batch(48)
    res["eager_pass_host_and_wall_s"] = [timed(lambda: g._loss_and_grads(st)) for _ in range(3)]
    grad = torch.autograd.grad  # the forward alone: gradients replaced by zeros
    torch.autograd.grad = lambda loss, params: [torch.zeros_like(p) for p in params]
    try:
        res["forward_host_and_wall_s"] = [timed(lambda: g._loss_and_grads(st)) for _ in range(3)]
    finally:
        torch.autograd.grad = grad
    res["capture_s"] = [timed(lambda: g(batch(length)))[1] for length in (56, 64)]  # new shapes
    pr = cProfile.Profile()
    st = batch(72)
    torch.cuda.synchronize()
    pr.enable()
    g(st)
    torch.cuda.synchronize()
    pr.disable()
    print(json.dumps(res, indent=1))
    for key, n in (("tottime", 45), ("cumtime", 40)):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(n)
        print(s.getvalue())


if __name__ == "__main__":
    main()
