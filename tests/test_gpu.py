"""On a CUDA GPU: the real 4-bit path on the DeepSeek-R1-Distill-Qwen-1.5B architecture (random weights built from its
config; the hub is unreachable here), the fast backend's self-check in bf16, CUDA graphs against the eager steps, the
fused kernels and folded attention bit for bit against HF's. Run: python -m pytest -m gpu -s."""

import json
import os
import time
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from finllm_pl.__main__ import cli_main
from finllm_pl.assets import build_random_qwen_1_5b

pytestmark = pytest.mark.gpu
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _save(name: str, result: dict) -> None:
    print(json.dumps(result, indent=2))
    out = os.environ.get("FINLLM_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, name).write_text(json.dumps(result, indent=2))


def test_qlora_fit_on_the_1_5b_architecture_with_the_seed_recipe(workdir, tiny_dir):
    """The seed's recipe (plain backend, gradient checkpointing, micro 4 x 8) on the 1.5B shape fits a 16 GB card."""
    model_dir = build_random_qwen_1_5b(workdir / "qwen1.5b", tiny_dir)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cli = cli_main(["fit", "--config", "configs/deepseek_r1_distill_qwen_1.5b.yaml",
                    "--model.model_name_or_path", str(model_dir), "--data.train_path", "data/sample.jsonl",
                    "--data.val_fraction", "0.1", "--trainer.max_steps", "6", "--trainer.max_epochs", "1",
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--checkpoint.every_n_train_steps", "3", "--data.max_length", "256"])
    peak = torch.cuda.max_memory_allocated() / 2**30
    ckpt = Path("checkpoints/deepseek_r1_distill_qwen_1.5b/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    result = {"gpu": torch.cuda.get_device_name(), "checkpoint_mb": ckpt.stat().st_size / 2**20, "peak_gib": peak,
              "fit_wall_s": time.perf_counter() - t0, "train_loss": metrics.get("train/loss"),
              "steps": cli.trainer.global_step, "backend": cli.model.backend.describe()}
    _save("gpu_seed_recipe_1.5b.json", result)
    assert cli.trainer.global_step == 6 and cli.model.backend.name == "plain"
    assert sum(v.numel() for v in state.values()) == 1_089_536  # LoRA r=4 on q/k/v/o of the 1.5B model, only
    assert result["checkpoint_mb"] < 20 and peak < 16 and torch.isfinite(torch.tensor(result["train_loss"]))


def test_the_self_check_keeps_every_component_on_the_1_5b_architecture_in_bf16(workdir, tiny_dir):
    """In bf16 on the GPU, on a stand-in of the 1.5B shape, every fast component is within the tolerance (a false
    alarm would silently cost the speed), and the check takes little time next to loading the model."""
    from finllm_pl.backend import RunShape, plan

    model_dir = build_random_qwen_1_5b(workdir / "qwen1.5b", tiny_dir)
    shape = RunShape(str(model_dir), "nf4", torch.bfloat16, torch.device("cuda", 0), 4, 8, QKVO, None, False, 512, True)
    t0 = time.perf_counter()
    d = plan("fast", shape)
    seconds = time.perf_counter() - t0
    _save("gpu_selfcheck_1.5b.json", {"on": d.on, "off": d.off, "seconds": seconds})
    assert d.on == ["dequantize", "sparse_head", "label_tree", "prefix_reuse", "static_step", "cuda_graphs",
                    "lora_groups", "kernels", "folded_attention"], d.lines()
    assert seconds < 30


class _StepLosses(Callback):
    """The logged window loss after each optimizer step."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and "train/loss" in trainer.callback_metrics:
            self.by_step.setdefault(trainer.global_step, float(trainer.callback_metrics["train/loss"]))


def test_the_fast_fit_follows_the_plain_fit(workdir, tiny_dir):
    """The fast backend on a real GPU in bf16 (captured + replayed steps of several length buckets with the shared
    prefix packed, accumulation 2; also split into row chunks) gives the plain backend's losses (bf16 rounding
    apart), and the first capture proved itself against its eager step."""
    args = ["--config", "configs/smoke.yaml", "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
            "--model.compute_dtype", "bfloat16", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--data.batch_size", "4", "--model.warmup_steps", "2", "--model.lora_dropout", "0",
            "--model.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "1"]
    runs = {}
    for name, extra in {"plain": ["--model.backend", "plain"], "fast": [],
                        "chunked": ["--model.chunk_tokens", "100"]}.items():
        losses = _StepLosses()
        cli = cli_main([*args, *extra, "--checkpoint.dirpath", f"ck_{name}"], run=False)
        cli.trainer.callbacks.append(losses)
        cli.trainer.fit(cli.model, cli.datamodule)
        runs[name] = (losses.by_step, cli)
    plain = runs["plain"][0]
    for name in ("fast", "chunked"):
        losses, step = runs[name][0], runs[name][1].model.backend.step
        assert step is not None and step.use_graphs and len(step.graphs) >= 2  # really captured, several shapes
        assert all(key[0][2] > key[0][1] for key in step.graphs)  # (rows, length, prefix + length): packed
        assert plain.keys() == losses.keys() and len(plain) >= 4
        for s in plain:
            assert losses[s] == pytest.approx(plain[s], rel=2e-2), (name, s, plain, losses)
    chunk_rows = {key[0][0] for key in runs["chunked"][1].model.backend.step.graphs}
    assert max(chunk_rows) < 4  # 4-row batches were split


def test_later_shapes_are_captured_without_an_eager_warm_up_and_each_matches_the_eager_step():
    """After the first shape (eager step, capture, and the replay that proves the capture), a new shape is
    captured at once and replayed for its result; every result matches the eager step on the same batch (fp32)."""
    from test_graphs import _batch, _tiny_lora

    from finllm_pl.backend import FastBackend

    model = _tiny_lora("qwen2").cuda()
    graphed = FastBackend(model, torch.float32, ["sparse_head", "static_step", "cuda_graphs", "lora_groups",
                                                 "kernels"]).step
    eager = FastBackend(model, torch.float32, ["sparse_head", "static_step", "lora_groups", "kernels"]).step
    passes = []
    run = graphed.loss_and_grads
    graphed.loss_and_grads = lambda st: (passes.append(1), run(st))[1]
    batches = [{k: v.cuda() for k, v in _batch(12, lengths).items()} for lengths in ((3, 9, 5, 17), (3, 4, 5, 6),
                                                                                    (30, 2, 3, 4))]

    def check(batch):
        loss, n, grads = graphed._replay(batch)
        ref_loss, ref_n, ref_grads = eager.loss_and_grads(batch)
        assert n == ref_n
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * r.abs().max())

    check(batches[0])
    assert len(passes) == 2 and len(graphed.graphs) == 1 and graphed.use_graphs  # eager step + capture, proved
    check(batches[1])
    assert len(passes) == 3 and len(graphed.graphs) == 2  # capture only
    check(batches[2])
    for b in batches:  # replays
        check(b)
    assert len(passes) == 4


def test_gpu_labels_match_cpu_labels(workdir):
    """predict on the GPU (plain and fast backends; scores copied back without waiting, written one batch behind,
    pinned batches, workers taking turns by chunk, token-budget batches) writes every row, in input order, with the
    CPU run's labels and probabilities (fp32 on both)."""
    args = ["predict", "--config", "configs/smoke.yaml", "--data.predict_path", "data/sample.jsonl",
            "--data.eval_batch_size", "8", "--data.predict_chunk_rows", "20", "--data.num_workers", "1",
            "--trainer.precision", "32-true", "--model.compute_dtype", "float32", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]
    fast = ["--data.num_workers", "3", "--data.eval_batch_tokens", "600"]
    rows = {}
    for name, acc, extra in (("cpu", "cpu", ["--model.backend", "plain"]), ("gpu", "gpu", ["--model.backend", "plain"]),
                             ("gpu_fast", "gpu", fast)):
        cli_main([*args, "--trainer.accelerator", acc, "--data.predict_output", f"{name}.jsonl", *extra])
        rows[name] = [json.loads(line) for line in Path(f"{name}.jsonl").read_text().splitlines()]
    n_in = sum(1 for line in Path("data/sample.jsonl").read_text().splitlines() if line.strip())
    for name in ("gpu", "gpu_fast"):
        assert len(rows[name]) == len(rows["cpu"]) == n_in
        for a, b in zip(rows["cpu"], rows[name]):
            assert a["id"] == b["id"] and a["label"] == b["label"], (name, a, b)
            assert all(abs(a["probs"][k] - b["probs"][k]) < 1e-4 for k in a["probs"]), (name, a, b)


def test_packed_rows_run_flash_attentions_bottom_right_causal_mask_with_the_masked_paths_result(monkeypatch):
    """On CUDA in bf16 the rows of a packed shared-prefix pass attend through flash attention's bottom-right causal
    mask instead of the explicit causal + padding mask: the same hidden states at the rows' real tokens and the
    same LoRA gradients of a loss over them (the padding is never supervised)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finllm_pl import model as hf
    from finllm_pl.backend import static
    from finllm_pl.backend.tree import Head

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = hf.add_lora(Qwen2ForCausalLM(config).to("cuda", torch.bfloat16), 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    head = torch.randint(1, 97, (12,), generator=g)
    seqs = [torch.cat([head, torch.randint(1, 97, (n,), generator=g)]) for n in (3, 9, 5, 17)]
    ids = torch.stack([torch.cat([r, r.new_zeros(29 - len(r))]) for r in seqs])
    mask = torch.stack([torch.arange(29) < len(r) for r in seqs]).long()
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :13] = -100  # supervised after the prefix: it is shared
    st = {k: v.cuda() for k, v in static.static_batch(ids, mask, labels, shared_prefix=8).items()}
    assert st["g_pre"].shape == (1, 12)
    real = st["g_mask"][:, :, 12:].diagonal(dim1=1, dim2=2)  # [rows, S]: a token sees itself iff it is real
    weights = torch.randn(*st["g_ids"].shape, 128, device="cuda", dtype=torch.bfloat16) * real[..., None]
    params = [p for p in model.parameters() if p.requires_grad]
    flash = []
    check = static._flash_rows
    monkeypatch.setattr(static, "_flash_rows", lambda *a: flash.append(check(*a)) or flash[-1])

    def run():
        hidden = static.static_hidden(Head(model), st)
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
    """kernels.silu_mul (jiterator): forward and both gradients bit for bit eager torch's `F.silu(g) * u`, on a
    ragged size and a transposed gradient, and the same again replayed from a CUDA graph."""
    from finllm_pl.backend.kernels import silu_mul

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
    """The rotary dispatcher inside fused_rope() (jiterator): q and k rotated, and their gradients, bit for bit HF's
    apply_rotary_pos_emb on q/k as the attention layers make them (views of one q/k/v output), the 1.5B model's
    heads, one cos/sin for every row (the packed step's) and per row; and the same replayed from a CUDA graph."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from finllm_pl.backend.kernels import RopeDispatch, fused_rope

    torch.manual_seed(0)
    original = apply_rotary_pos_emb.original if isinstance(apply_rotary_pos_emb, RopeDispatch) else apply_rotary_pos_emb
    dispatch = RopeDispatch(original)

    def fused(*a):
        with fused_rope():
            return dispatch(*a)

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

        ref, got = run(original), run(fused)
        for name, a, b in zip(("q", "k", "d_qkv"), got, ref):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b), (name, (a.float() - b.float()).abs().max())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(fused)
    qkv.mul_(-1)  # new inputs in the graph's buffers
    graph.replay()
    assert all(torch.equal(a, b) for a, b in zip(captured, run(original)))


def test_fused_norms_keep_the_input_dtype_under_autocast():
    """CUDA autocast runs rms_norm in fp32 with an fp32 output; HF's norms return the input's dtype, and so must
    kernels.py's (else every norm adds casts and fp32 activations)."""
    from test_kernels import _tiny

    from finllm_pl.backend.kernels import layer_forwards

    decoder = _tiny("qwen2").model.cuda().to(torch.bfloat16)
    forwards, _ = layer_forwards(decoder)
    x = torch.randn(3, 5, 32, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for m in (decoder.layers[0].input_layernorm, decoder.layers[0].mlp):
            ref, got = m(x), forwards[m](x)
            assert got.dtype == ref.dtype == torch.bfloat16
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("rows,queries,prefix", [(239, 95, 45), (520, 21, 45), (17, 19, 45), (64, 60, 0)])
def test_folded_attention_is_hf_s_sdpa_bit_for_bit(rows, queries, prefix):
    """attention.folded_sdpa at labeling's shapes (the 1.5B model's 12 query heads on 2 key/value heads, a boolean
    mask over prefix + own keys) against HF's sdpa path (repeat_kv): the same memory-efficient kernel computes each
    query row from the same keys and mask, so the same bits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from finllm_pl.backend.attention import folded_sdpa

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
