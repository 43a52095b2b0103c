"""The real 4-bit path on a GPU: the DeepSeek-R1-Distill-Qwen-1.5B architecture (random weights built from its
config; the hub is unreachable here) fine-tuned for a few steps through the CLI. Run: pytest -m gpu -s."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from finllm_pl.__main__ import cli_main
from finllm_pl.assets import build_random_qwen_1_5b

pytestmark = pytest.mark.gpu

def test_qlora_fit_on_the_1_5b_architecture(workdir, tiny_dir):
    model_dir = build_random_qwen_1_5b(workdir / "qwen1.5b", tiny_dir)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cli = cli_main(["fit", "--config", "configs/deepseek_r1_distill_qwen_1.5b.yaml",
                    "--model.model_name_or_path", str(model_dir), "--data.train_path", "data/sample.jsonl",
                    "--data.val_fraction", "0.1", "--trainer.max_steps", "6", "--trainer.max_epochs", "1",
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--checkpoint.every_n_train_steps", "3", "--data.max_length", "256"])
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    ckpt = Path("checkpoints/deepseek_r1_distill_qwen_1.5b/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    n_params = sum(v.numel() for v in state.values())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    result = {"gpu": torch.cuda.get_device_name(), "checkpoint_mb": ckpt.stat().st_size / 2**20,
              "checkpoint_tensors": n_params, "peak_gib": peak, "fit_wall_s": wall,
              "tokens_per_s": metrics.get("train/tokens_per_s"), "train_loss": metrics.get("train/loss"),
              "val_f1_weighted": metrics.get("val/f1_weighted"), "steps": cli.trainer.global_step}
    print(json.dumps(result, indent=2))
    out = os.environ.get("FINLLM_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_test_1.5b.json").write_text(json.dumps(result, indent=2))
    assert cli.trainer.global_step == 6
    assert n_params == 1_089_536  # LoRA r=4 on q/k/v/o of the 1.5B model, and nothing else
    assert result["checkpoint_mb"] < 20
    assert peak < 16  # the seed's recipe must fit a 16 GB card
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    assert (Path("checkpoints/deepseek_r1_distill_qwen_1.5b/adapter") / "adapter_model.safetensors").exists()


class _StepLosses(Callback):
    """The logged window loss after each optimizer step."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and "train/loss" in trainer.callback_metrics:
            self.by_step.setdefault(trainer.global_step, float(trainer.callback_metrics["train/loss"]))


def test_cuda_graphs_fit_follows_the_eager_fit(workdir, tiny_dir):
    """model.cuda_graphs on a real GPU: captured + replayed steps (several length buckets, accumulation 2), also
    split into row chunks (model.chunk_tokens) with torch.compile'd layers (model.compile_layers), give the eager
    run's losses (bf16 rounding apart)."""
    args = ["--config", "configs/smoke.yaml", "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
            "--model.compute_dtype", "bfloat16", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--data.batch_size", "4", "--model.warmup_steps", "2", "--model.lora_dropout", "0",
            "--model.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "1"]
    runs = {}
    variants = {"eager": ["--model.cuda_graphs", "false"], "graphs": ["--model.cuda_graphs", "true"],
                # row chunks of <= 100 padded tokens, each its own captured shape, with torch.compile'd kernels
                "chunked_compiled": ["--model.cuda_graphs", "true", "--model.chunk_tokens", "100",
                                     "--model.compile_layers", "true"],
                # norms and MLPs in kernels.py's fused kernels (jiterator's compiled at the warm-up, then captured)
                "graphs_fused": ["--model.cuda_graphs", "true", "--model.fused_layers", "true"]}
    for name, extra in variants.items():
        losses = _StepLosses()
        cli = cli_main([*args, *extra, "--checkpoint.dirpath", f"ck_{name}"], run=False)
        cli.trainer.callbacks.append(losses)
        cli.trainer.fit(cli.model, cli.datamodule)
        runs[name] = (losses.by_step, cli)
    eager = runs["eager"][0]
    for name in ("graphs", "chunked_compiled", "graphs_fused"):
        graphed, g = runs[name][0], runs[name][1].model._graphed
        assert g is not None and g.use_graphs and len(g.graphs) >= 2  # really captured, more than one shape
        assert all(rows_len_keys[2] > rows_len_keys[1] for (rows_len_keys, _) in g.graphs)  # with the shared prefix
        assert eager.keys() == graphed.keys() and len(eager) >= 4
        for step in eager:
            assert graphed[step] == pytest.approx(eager[step], rel=2e-2), (name, step, eager, graphed)
    fused = {type(m).__name__ for m in runs["graphs_fused"][1].model._graphed.forwards}
    assert {"Qwen2RMSNorm", "Qwen2MLP"} <= fused and not runs["graphs_fused"][1].model._graphed.compiled
    chunk_rows = {rows for ((rows, _, _), _) in runs["chunked_compiled"][1].model._graphed.graphs}
    assert max(chunk_rows) < 4 and runs["chunked_compiled"][1].model._graphed.compiled  # 4-row batches were split


def test_gpu_labels_match_cpu_labels(workdir, monkeypatch):
    """predict on the GPU (scores copied back without waiting, written one batch behind, pinned batches; and with
    the fast config's labeling: 3 workers taking turns by chunk, compiled norms/MLPs, attention off cuDNN)
    writes every row, in input order, with the CPU run's labels and probabilities (fp32 on both)."""
    args = ["predict", "--config", "configs/smoke.yaml", "--data.predict_path", "data/sample.jsonl",
            "--data.eval_batch_size", "8", "--data.predict_chunk_rows", "20", "--data.num_workers", "1",
            "--trainer.precision", "32-true", "--model.compute_dtype", "float32", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]
    fast = ["--data.num_workers", "3", "--model.cuda_graphs", "true", "--model.compile_layers", "true",
            "--data.eval_batch_tokens", "600"]
    from finllm_pl import module

    monkeypatch.setattr(module, "LABEL_COMPILE_MIN_ROWS", 0)  # compile even for this small job
    rows = {}
    fused = [*fast, "--model.fused_layers", "true"]  # kernels.py's norms and MLPs: nothing left to compile
    for name, acc, extra in (("cpu", "cpu", []), ("gpu", "gpu", []), ("gpu_fast", "gpu", fast),
                             ("gpu_fused", "gpu", fused)):
        cli_main([*args, "--trainer.accelerator", acc, "--data.predict_output", f"{name}.jsonl", *extra])
        rows[name] = [json.loads(line) for line in Path(f"{name}.jsonl").read_text().splitlines()]
    n_in = sum(1 for line in Path("data/sample.jsonl").read_text().splitlines() if line.strip())
    for name in ("gpu", "gpu_fast", "gpu_fused"):
        assert len(rows[name]) == len(rows["cpu"]) == n_in
        for a, b in zip(rows["cpu"], rows[name]):
            assert a["id"] == b["id"] and a["label"] == b["label"], (name, a, b)
            assert all(abs(a["probs"][k] - b["probs"][k]) < 1e-4 for k in a["probs"]), (name, a, b)


def test_later_shapes_are_captured_without_an_eager_warm_up_and_a_shape_that_must_compile_gets_one():
    """After the first shape (eager warm-up, then capture), a new shape is captured at once and replayed for its
    result; one whose compiled norms/MLPs must be compiled again (here: dynamo's cache reset) falls back to the
    warm-up. Every result matches the eager step on the same batch (fp32, compiled kernels on both sides)."""
    from test_graphs import _batch, _tiny_lora

    from finllm_pl.graphs import GraphedLossBackward

    model = _tiny_lora("qwen2").cuda()
    graphed = GraphedLossBackward(model, torch.float32, use_graphs=True, compile_layers=True)
    eager = GraphedLossBackward(model, torch.float32, use_graphs=False, compile_layers=True)
    passes = []
    run = graphed._loss_and_grads
    graphed._loss_and_grads = lambda st: (passes.append(1), run(st))[1]
    shapes = [(3, 9, 5, 17), (3, 4, 5, 6), (30, 2, 3, 4)]
    batches = [{k: v.cuda() for k, v in _batch(12, lengths).items()} for lengths in shapes]
    assert len({b["g_ids"].shape for b in batches}) == 3

    def check(batch):
        loss, n, grads = (x for x in graphed._replay(batch))
        ref_loss, ref_n, ref_grads = eager._loss_and_grads(batch)
        assert n == ref_n
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * r.abs().max())

    check(batches[0])
    assert len(passes) == 2 and len(graphed.graphs) == 1  # warm-up + capture
    check(batches[1])
    assert len(passes) == 3 and len(graphed.graphs) == 2  # capture only
    torch._dynamo.reset()
    check(batches[2])
    assert len(passes) == 6 and len(graphed.graphs) == 3  # refused capture, warm-up (compiles), capture
    for b in batches:  # replays
        check(b)
    assert len(passes) == 6


def test_packed_rows_run_flash_attentions_bottom_right_causal_mask_with_the_masked_paths_result(monkeypatch):
    """On CUDA in bf16 the rows of a packed shared-prefix pass attend through flash attention's bottom-right causal
    mask instead of the explicit causal + padding mask: the same hidden states at the rows' real tokens and the
    same LoRA gradients of a loss over them (the padding is never supervised)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finllm_pl import graphs
    from finllm_pl import model as hf
    from finllm_pl.data import static_batch

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = hf.add_lora(Qwen2ForCausalLM(config).to("cuda", torch.bfloat16), 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    decoder = hf.split_head(model)[0]
    g = torch.Generator().manual_seed(1)
    head = torch.randint(1, 97, (12,), generator=g)
    seqs = [torch.cat([head, torch.randint(1, 97, (n,), generator=g)]) for n in (3, 9, 5, 17)]
    ids = torch.stack([torch.cat([r, r.new_zeros(29 - len(r))]) for r in seqs])
    mask = torch.stack([torch.arange(29) < len(r) for r in seqs]).long()
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :13] = -100  # supervised after the prefix: it is shared
    st = {k: v.cuda() for k, v in static_batch(ids, mask, labels, shared_prefix=8).items()}
    assert st["g_pre"].shape == (1, 12)
    real = st["g_mask"][:, :, 12:].diagonal(dim1=1, dim2=2)  # [rows, S]: a token sees itself iff it is real
    weights = torch.randn(*st["g_ids"].shape, 128, device="cuda", dtype=torch.bfloat16) * real[..., None]
    params = [p for p in model.parameters() if p.requires_grad]
    flash = []
    check = graphs._flash_rows
    monkeypatch.setattr(graphs, "_flash_rows", lambda *a: flash.append(check(*a)) or flash[-1])

    def run():
        hidden = graphs.packed_prefix_hidden(decoder, st, torch.bfloat16)
        return hidden.float()[real], torch.autograd.grad((hidden * weights).float().sum(), params)

    got, grads = run()
    assert flash == [True, True]  # both layers' rows ran the flash kernel
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # flash off: the explicit mask
        ref, ref_grads = run()
    assert flash[2:] == [False, False]
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=3e-2 * b.abs().max(), rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_kernel_rounds_as_eager_torch_also_replayed_from_a_cuda_graph(dtype):
    """kernels.silu_mul (jiterator): forward and both gradients bit for bit eager torch's `F.silu(g) * u` (which
    rounds silu's output and the product's gradient to bf16), on a ragged size and a transposed gradient, and the
    same again replayed from a CUDA graph."""
    from finllm_pl.kernels import silu_mul

    torch.manual_seed(0)
    g, u = (torch.randn(1000, 4099, device="cuda", dtype=dtype) * 4 for _ in range(2))
    dp = (torch.randn(4099, 1000, device="cuda", dtype=dtype) * 4).t()  # not contiguous

    def run(fn, g, u, dp):
        g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
        out = fn(g, u)
        return (out.detach(), *torch.autograd.grad(out, (g, u), dp))

    ref = run(lambda g, u: torch.nn.functional.silu(g) * u, g, u, dp)
    got = run(silu_mul, g, u, dp)
    for name, a, b in zip(("out", "d_gate", "d_up"), got, ref):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), (name, (a.float() - b.float()).abs().max())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(silu_mul, g, u, dp)
    g.mul_(-1)  # new inputs in the graph's buffers
    graph.replay()
    ref = run(lambda g, u: torch.nn.functional.silu(g) * u, g, u, dp)
    assert all(torch.equal(a, b) for a, b in zip(captured, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_kernel_rounds_as_hf_s_rotary_embedding_also_replayed_from_a_cuda_graph(dtype):
    """kernels._Rope (jiterator): q and k rotated, and their gradients, bit for bit HF's apply_rotary_pos_emb on q/k
    as the attention layers make them (views of one q/k/v matmul's output), the 1.5B model's heads, one cos/sin
    for every row (the packed step's) and per row; and the same again replayed from a CUDA graph."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from finllm_pl.kernels import _fused_rope

    torch.manual_seed(0)
    fused = _fused_rope(apply_rotary_pos_emb)
    for rows, tokens, cos_rows in ((1, 2000, 1), (4, 300, 4)):
        qkv = torch.randn(rows, tokens, 16 * 128, device="cuda", dtype=dtype) * 3
        pos = torch.arange(tokens, device="cuda").expand(cos_rows, -1)[..., None] * torch.rand(64, device="cuda")
        cos, sin = (torch.cat([f(pos), f(pos)], -1).to(dtype) for f in (torch.cos, torch.sin))
        grads = [torch.randn(rows, h, tokens, 128, device="cuda", dtype=dtype) for h in (12, 2)]

        def run(fn):
            x = qkv.detach().requires_grad_()
            q, k, _ = x.view(rows, tokens, 16, 128).transpose(1, 2).split([12, 2, 2], 1)
            out = fn(q, k, cos, sin)
            return (*(o.detach() for o in out), *torch.autograd.grad(out, x, grads))

        ref, got = run(apply_rotary_pos_emb), run(fused)
        for name, a, b in zip(("q", "k", "d_qkv"), got, ref):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b), (name, (a.float() - b.float()).abs().max())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(fused)
    qkv.mul_(-1)  # new inputs in the graph's buffers
    graph.replay()
    assert all(torch.equal(a, b) for a, b in zip(captured, run(apply_rotary_pos_emb)))


_COMPILE_CHECK = """
import os, sys, torch
from pathlib import Path
from finllm_pl import kernels
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

cache = Path(os.environ["PYTORCH_KERNEL_CACHE_PATH"])
kernels.compile_in_background(torch.device("cuda"), torch.bfloat16)
kernels._wait_for_compiler()
files = sorted(f.name for f in cache.iterdir())
print(sorted(name.split("_arch")[0] for name in files))
# the fast paths' own calls: a gated MLP's [tokens, 8960] activations, q/k views of the 1.5B model's q/k/v output
g, u = (torch.randn(300, 8960, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
out = kernels.silu_mul(g, u)
out.backward(torch.randn_like(out))  # (as down_proj's backward hands it: contiguous)
qkv = torch.randn(2, 50, 16 * 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
q, k, _ = qkv.view(2, 50, 16, 128).transpose(1, 2).split([12, 2, 2], 1)
cos, sin = (torch.randn(2, 50, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
sum(t.float().sum() for t in kernels._fused_rope(apply_rotary_pos_emb)(q, k, cos, sin)).backward()
torch.cuda.synchronize()
print(sorted(f.name for f in cache.iterdir()) == files)
"""


def test_the_background_compile_covers_the_kernels_the_fast_paths_use(tmp_path):
    """kernels.compile_in_background (in a new process, with its own kernel cache): the thread compiles the three
    bf16 kernels, and the fast paths' own calls after it compile nothing more (no new file in the cache)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTORCH_KERNEL_CACHE_PATH": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout.split("\n")
    assert out[:2] == ["['rope', 'silu_mul_backward_vectorized8', 'silu_mul_vectorized8']", "True"], out


def test_fused_norms_keep_the_input_dtype_under_autocast():
    """CUDA autocast runs rms_norm in fp32 with an fp32 output; HF's norms return the input's dtype, and so must
    kernels.py's (else every norm adds casts and fp32 activations)."""
    from test_kernels import _tiny

    from finllm_pl.kernels import fused_layer_forwards

    decoder = _tiny("qwen2").model.cuda().to(torch.bfloat16)
    forwards = fused_layer_forwards(decoder)
    x = torch.randn(3, 5, 32, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for m in (decoder.layers[0].input_layernorm, decoder.layers[0].mlp):
            ref, got = m(x), forwards[m](x)
            assert got.dtype == ref.dtype == torch.bfloat16
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("rows,queries,prefix", [(239, 95, 45), (520, 21, 45), (17, 19, 45), (64, 60, 0)])
def test_folded_attention_is_hf_s_sdpa_bit_for_bit(rows, queries, prefix):
    """attention.folded_sdpa at labeling's shapes (the 1.5B model's 12 query heads on 2 key/value heads, a
    boolean mask over prefix + own keys) against HF's sdpa path (repeat_kv): the same memory-efficient kernel
    computes each query row from the same keys and mask, so the same bits."""
    import types

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from finllm_pl.attention import folded_sdpa

    torch.manual_seed(0)
    keys = queries + prefix
    q = torch.randn(rows, queries, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(rows, 2, keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.rand(rows, 1, queries, keys, device="cuda") > 0.3
    mask[..., 0] = True
    module = types.SimpleNamespace(num_key_value_groups=6, is_causal=True)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=128 ** -0.5)
        got, _ = folded_sdpa(module, q, k, v, mask, 128 ** -0.5)
    assert got.shape == ref.shape and torch.equal(got, ref)
