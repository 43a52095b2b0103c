"""Where the host time of a CUDA-graph capture of the training step goes (1.5B architecture, random bf16 weights,
LoRA r=4 q/k/v/o, fused_layers, static micro-batches of 32 rows with a 45-token shared prefix): the first shape
(eager warm-up + capture), an eager pass's host time, forward only, two captures of new shapes, and a cProfile of a
third (sorted by own and by cumulative time). On an H100 (2026-11-26): captures 0.22 s each; under cProfile the
autograd engine's backward 80 ms, the modules' forward 69 ms, graph instantiation 20 ms, peft's
disable_input_dtype_casting 17 ms, functional_call's tie search 13 ms. Making the last two cheaper (and capturing
later shapes without torch.cuda.graph's sync + empty_cache) changed nothing measurable in the epoch
(results/gpu/fit_epoch_capture_host_experiment.json).

    python benchmarks/capture_host.py > capture_host.txt
"""
import cProfile, io, json, pstats, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from finllm_pl import model as hf
from finllm_pl.assets import QWEN_1_5B
from finllm_pl.data import static_batch
from finllm_pl.graphs import GraphedLossBackward

torch.manual_seed(0)
with torch.device("cuda"):
    model = Qwen2ForCausalLM._from_config(Qwen2Config(**QWEN_1_5B), dtype=torch.bfloat16, attn_implementation="sdpa")
model = hf.add_lora(model, 4, 8, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
model.train()
g = GraphedLossBackward(model, torch.bfloat16, use_graphs=True, fused_layers=True)


def batch(length, rows=32, prefix=45):
    gen = torch.Generator().manual_seed(length)
    head = torch.randint(100, 1000, (prefix,), generator=gen)
    ids = torch.cat([head.expand(rows, -1), torch.randint(100, 1000, (rows, length), generator=gen)], 1)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    st = static_batch(ids, mask, labels, shared_prefix=8, rows=rows)
    return {k: v.cuda() for k, v in st.items() if k.startswith("g_")}


res = {}
first = batch(40)
t0 = time.perf_counter(); g(first); torch.cuda.synchronize(); res["first_shape_s"] = time.perf_counter() - t0
# eager passes: forward vs backward host time (synced before and after each)
import torch.nn.functional as F
st = batch(48)
for i in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out = g._loss_and_grads(st)
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    res.setdefault("eager_pass_host_s", []).append(round(t1 - t0, 4)); res.setdefault("eager_pass_wall_s", []).append(round(t2 - t0, 4))
# forward only host time
orig = torch.autograd.grad
def fwd_only(loss, params): return [torch.zeros_like(p) for p in params]
torch.autograd.grad = fwd_only
for i in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter(); g._loss_and_grads(st); t1 = time.perf_counter(); torch.cuda.synchronize()
    res.setdefault("forward_host_s", []).append(round(t1 - t0, 4))
torch.autograd.grad = orig
# captures of new shapes, timed, and one under cProfile
for L in (56, 64):
    st = batch(L); torch.cuda.synchronize(); t0 = time.perf_counter(); g(st); torch.cuda.synchronize()
    res.setdefault("capture_s", []).append(round(time.perf_counter() - t0, 4))
pr = cProfile.Profile()
st = batch(72); torch.cuda.synchronize(); pr.enable(); g(st); torch.cuda.synchronize(); pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(45)
res["kernels_per_step"] = None
print(json.dumps(res, indent=1))
print(s.getvalue())
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(40)
print(s.getvalue())
