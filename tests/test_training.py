"""fit / validate through the CLI in-process on the tiny model: adapter-only checkpoints, export, exact resume."""

import json
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from finllm_pl.__main__ import cli_main

# 7 micro-batches per epoch at accumulation 2: windows [0,1] [2,3] [4,5] [6] (the last one partial), 2 epochs.
FAST = ["--config", "configs/smoke.yaml", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "7",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar",
        "false", "--trainer.logger", "false", "--data.batch_size", "4", "--model.warmup_steps", "2",
        "--checkpoint.every_n_train_steps", "1"]


class Losses(Callback):
    """Records the logged window loss after every optimizer step: {global_step: loss}."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step not in self.by_step and "train/loss" in trainer.callback_metrics and step > 0:
            self.by_step[step] = float(trainer.callback_metrics["train/loss"])


class StopAfter(Callback):
    """Saves a checkpoint after micro-batch `n` of the first epoch, as ModelCheckpoint would, then dies."""

    def __init__(self, n, path):
        self.n, self.path = n, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.n:
            trainer.save_checkpoint(self.path)
            raise _Stop()


class _Stop(Exception):
    pass


def _run(args, callbacks=(), ckpt_path=None):
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _adapter(cli):
    return {k: v.clone() for k, v in cli.model.model.named_parameters() if v.requires_grad}


def _assert_trains_alike(ref_losses, ref, losses, cli):
    """The same per-step losses (rel 1e-5) and adapter (Adam magnifies fp32 rounding) as the reference run."""
    assert ref_losses.by_step.keys() == losses.by_step.keys() and len(ref_losses.by_step) >= 3
    for step, loss in ref_losses.by_step.items():
        assert losses.by_step[step] == pytest.approx(loss, rel=1e-5), step
    got = _adapter(cli)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3)


def test_fit_writes_adapter_only_checkpoints_and_a_peft_adapter(workdir, tiny_dir):
    cli = _run(FAST)
    ckpt_dir = Path("checkpoints/smoke")
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    keys = set(last["state_dict"])
    assert keys == {f"model.{k}" for k in _adapter(cli)} and all("lora_" in k for k in keys)
    assert last["finllm"]["lora"]["r"] == 8 and "optimizer_states" in last and "lr_schedulers" in last
    assert (ckpt_dir / "last.ckpt").stat().st_size < 1_000_000  # the 4-bit base never goes in
    assert cli.trainer.global_step == 8  # 4 optimizer steps per epoch (3 full windows + 1 partial) x 2

    adapter = ckpt_dir / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "prompt_format.json"):
        assert (adapter / name).exists(), name
        assert (adapter / name).stat().st_mode & 0o044 == 0o044 & ~_umask(), name  # readable as a mkdir'd file
    assert adapter.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    fmt = json.loads((adapter / "prompt_format.json").read_text())
    assert fmt["style"] == "chat" and fmt["think"] == "empty" and fmt["labels"] == ["negative", "neutral", "positive"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(adapter))
    trained = _adapter(cli)
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, trained[name]), name


@pytest.mark.parametrize("stop_after", [3, 4, 6], ids=["window-boundary", "mid-window", "epoch-end"])
def test_resume_reproduces_the_uninterrupted_run(workdir, stop_after):
    straight_losses = Losses()
    straight = _run(FAST + ["--checkpoint.dirpath", "ck_a"], [straight_losses])
    want = _adapter(straight)

    ckpt = workdir / "stop.ckpt"
    with pytest.raises(_Stop):
        _run(FAST + ["--checkpoint.dirpath", "ck_b"], [StopAfter(stop_after, str(ckpt))])
    resumed_losses = Losses()
    resumed = _run(FAST + ["--checkpoint.dirpath", "ck_b"], [resumed_losses], ckpt_path=str(ckpt))

    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    assert resumed_losses.by_step, "the resumed run logged no steps"
    for step, loss in resumed_losses.by_step.items():
        assert loss == straight_losses.by_step[step], f"step {step}: {loss} != {straight_losses.by_step[step]}"
    got = _adapter(resumed)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_validate_reports_metrics_via_cli(workdir):
    _run(FAST)
    cli_main(["validate", "--config", "configs/smoke.yaml", "--trainer.logger", "true",
              "--ckpt_path", "checkpoints/smoke/last.ckpt"])
    reports = sorted(Path("checkpoints/smoke/eval").glob("validate-*/validation.json"))  # (README: output layout)
    assert reports, "validate wrote no report"
    report = json.loads(reports[-1].read_text())
    assert set(report["per_class"]) == {"negative", "neutral", "positive"}
    assert report["support"] == 48 and sum(map(sum, report["confusion_matrix"])) == 48
    assert 0.0 <= report["f1_weighted"] <= 1.0 and report["val_loss"] > 0
    assert reports[-1].with_name("validation_confusion.png").stat().st_size > 1000
    assert "| negative |" in reports[-1].with_name("validation.md").read_text()


def test_dora_trains_its_magnitudes_and_exports_them(workdir, tiny_dir):
    """model.use_dora: peft's DoRA on the 4-bit base; the magnitude vectors train, go into the checkpoint and the
    adapter folder, and an export from last.ckpt rebuilds the same DoRA adapter."""
    args = FAST + ["--model.use_dora", "true", "--trainer.max_epochs", "1"]
    fresh = cli_main(args, run=False)
    fresh.model.configure_model()
    initial = _adapter(fresh)  # same seed: the adapter fit starts from
    cli = _run(args)
    trained = _adapter(cli)
    mags = [k for k in trained if "lora_magnitude_vector" in k]  # trainable, so in _adapter
    assert mags and initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in mags)  # the magnitudes learned
    last = torch.load(Path("checkpoints/smoke/last.ckpt"), weights_only=True)
    assert {f"model.{k}" for k in mags} <= set(last["state_dict"])
    config = json.loads((Path("checkpoints/smoke/adapter") / "adapter_config.json").read_text())
    assert config["use_dora"] is True

    from finllm_pl.export import adapter_from_checkpoint
    from safetensors.torch import load_file

    out = adapter_from_checkpoint("checkpoints/smoke/last.ckpt", "exported")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    ref = load_file("checkpoints/smoke/adapter/adapter_model.safetensors")
    got = load_file(str(out / "adapter_model.safetensors"))
    assert ref.keys() == got.keys() and any("magnitude" in k for k in got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


class SeenPrefix(Callback):
    """The shared-prefix lengths of the static training batches (0 = the batch ran whole)."""

    def __init__(self):
        self.lengths = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lengths.append(batch["g_pre"].shape[1] if "g_pre" in batch else 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_fast_backend_trains_like_the_plain_one(workdir, attn):
    """The fast backend (its static step: lengths padded to static buckets, explicit 4D mask, supervised-token
    slots, the rows' common prefix run once with its keys/values shared, gradients from autograd.grad added into
    p.grad across the accumulation window; the 4-bit base held dequantized; the fused linears and kernels) trains
    exactly like Hugging Face + peft as they are. Without CUDA the static step runs eagerly; the capture/replay
    itself is the gpu test's."""
    # (eager attention takes the 4D mask additive, sdpa boolean); no dropout: masks of padded shapes would differ
    args = FAST + ["--model.lora_dropout", "0", "--model.attn_implementation", attn]
    ref_losses, fast_losses, seen = Losses(), Losses(), SeenPrefix()
    ref = _adapter(_run(args + ["--model.backend", "plain"], [ref_losses]))
    cli = _run(args + ["--checkpoint.dirpath", "ck_fast"], [fast_losses, seen])
    backend = cli.model.backend
    assert backend.step is not None and backend.step.grads is not None  # the static path ran
    assert all(backend.on[c] for c in ("dequantize", "sparse_head", "label_tree", "prefix_reuse", "static_step",
                                       "lora_groups", "kernels")), backend.on
    assert seen.lengths and all(n >= 8 for n in seen.lengths)  # the smoke rows share template + instruction
    assert len(ref_losses.by_step) == 8
    _assert_trains_alike(ref_losses, ref, fast_losses, cli)
    got = _adapter(cli)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in got.items() if "lora_B" in k)  # it trained


def test_static_batch_slots_hold_every_supervised_token():
    from finllm_pl.backend.static import static_batch

    ids = torch.arange(2 * 7).view(2, 7)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6, 7], [-100, -100, 2, 3, 4, -100, -100]])
    st = static_batch(ids, mask, labels)
    assert st["g_ids"].shape == (2, 16) and st["g_mask"].shape == (2, 16, 16) and "g_pre" not in st
    # hidden state t predicts token t+1: row 0 supervises positions 2..5, row 1 positions 1..3
    assert st["g_idx"].shape[1] == 4 and st["g_w"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert st["g_idx"][0].tolist() == [2, 3, 4, 5] and st["g_idx"][1, :3].tolist() == [1, 2, 3]
    assert st["g_tgt"][0].tolist() == [4, 5, 6, 7] and st["g_tgt"][1, :3].tolist() == [2, 3, 4]
    assert not st["g_mask"][1, 6, 5] and st["g_mask"][1, 6, 4] and not st["g_mask"][0, 2, 3]


def test_static_batch_splits_off_the_shared_prefix_before_the_first_supervised_token():
    from finllm_pl.backend.static import static_batch

    # rows share tokens 0..4; row 1's answer starts at token 4, so its hidden state 3 is supervised: P = 3
    ids = torch.tensor([[9, 8, 7, 6, 5, 1, 2, 3], [9, 8, 7, 6, 5, 4, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    labels = torch.tensor([[-100] * 6 + [2, 3], [-100] * 4 + [5, 4, -100, -100]])
    st = static_batch(ids, mask, labels, shared_prefix=3)
    assert st["g_pre"].tolist() == [[9, 8, 7]]
    assert st["g_ids"][:, :5].tolist() == [[6, 5, 1, 2, 3], [6, 5, 4, 0, 0]] and st["g_ids"].shape == (2, 16)
    assert st["g_pos"][0, :3].tolist() == [3, 4, 5]  # positions continue after the prefix
    assert st["g_mask"].shape == (2, 16, 3 + 16) and st["g_mask"][:, :, :3].all()  # everyone sees the prefix
    assert st["g_mask"][1, 2, 3 + 2] and not st["g_mask"][1, 2, 3 + 3] and not st["g_mask"][1, 4, 3 + 3]
    # suffix hidden t predicts suffix token t + 1: row 0 supervises suffix tokens 3, 4 (ids 2, 3), row 1 ids 5, 4
    assert st["g_idx"][0, :2].tolist() == [2, 3] and st["g_tgt"][0, :2].tolist() == [2, 3]
    assert st["g_idx"][1, :2].tolist() == [0, 1] and st["g_tgt"][1, :2].tolist() == [5, 4]
    assert static_batch(ids, mask, labels, shared_prefix=4).keys() == st.keys() - {"g_pre"}  # 3 < 4: none


def test_static_lengths_are_few_and_pad_little():
    from finllm_pl.backend.static import static_length

    lengths = [static_length(n) for n in range(1, 513)]
    assert lengths[:16] == [16] * 16 and static_length(17) == 24 and static_length(65) == 80
    assert static_length(129) == 160 and static_length(512) == 512
    assert all(0 <= s - n < max(8, n / 4) for n, s in zip(range(17, 513), lengths[16:]))  # <= a quarter-octave
    assert len(set(lengths)) <= 24


def test_budget_batches_cut_by_rows_and_padded_tokens():
    from finllm_pl.batching import budget_batches

    lengths = [5, 3, 9, 9, 2, 7, 1, 30]
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])  # 7, 2, 3, 5, 0, 1, 4, 6
    assert budget_batches(order, lengths, 3) == [[7, 2, 3], [5, 0, 1], [4, 6]]
    got = budget_batches(order, lengths, 10, max_tokens=18)
    assert got == [[7], [2, 3], [5, 0], [1, 4, 6]]  # 30 > 18 alone; 9 + 9; 7 + 5 (a third row: 3 x 7 > 18)
    assert [i for b in got for i in b] == order
    asc = order[::-1]  # ascending order: the batch's longest row is its last
    assert all(len(b) * max(lengths[i] for i in b) <= 12 or len(b) == 1 for b in budget_batches(asc, lengths, 8, 12))


def test_dequantize_trains_exactly_like_the_4bit_layers(workdir):
    """The fast backend's dequantize swaps each 4-bit layer for a plain one holding its dequantized weight: the same
    losses and adapter as dequantizing at every forward and backward (dropout off: the RNG draws would match
    anyway, this keeps the comparison about the weights)."""
    import bitsandbytes as bnb

    args = FAST + ["--model.lora_dropout", "0", "--trainer.max_epochs", "1"]
    ref_losses, once_losses = Losses(), Losses()
    ref_cli = _run(args + ["--model.fast_skip", "[dequantize]"], [ref_losses])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ref_cli.model.model.modules())
    cli = _run(args + ["--checkpoint.dirpath", "ck_once"], [once_losses])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in cli.model.model.modules())
    _assert_trains_alike(ref_losses, _adapter(ref_cli), once_losses, cli)


@pytest.mark.parametrize("static", [False, True])
def test_chunked_micro_batches_train_like_whole_ones(workdir, static, monkeypatch):
    """model.chunk_tokens runs a micro-batch as row chunks (one forward + backward each, gradients summed): the
    same losses and adapter as whole micro-batches, on the eager step and on the static (CUDA-graph) step."""
    from finllm_pl.backend import fast, plain, static as static_mod

    splits, real = [], plain.row_chunks

    def counting(rows, length, max_tokens):
        parts = real(rows, length, max_tokens)
        if max_tokens is not None:  # (the backend's self-check on its stand-in runs whole batches)
            splits.append((rows, len(parts), max(p.stop - p.start for p in parts) * length))
        return parts

    args = FAST + ["--model.lora_dropout", "0", "--trainer.max_epochs", "1",
                   "--model.fast_skip", "[]" if static else "[static_step]"]
    ref_losses, chunk_losses = Losses(), Losses()
    ref = _adapter(_run(args, [ref_losses]))
    for mod in (plain, fast, static_mod):
        monkeypatch.setattr(mod, "row_chunks", counting)
    cli = _run(args + ["--model.chunk_tokens", "100", "--checkpoint.dirpath", "ck_chunks"], [chunk_losses])
    assert (cli.model.backend.step is not None) == static
    assert splits and all(n > 1 and tokens <= 100 for rows, n, tokens in splits if rows > 1)  # every batch split
    _assert_trains_alike(ref_losses, ref, chunk_losses, cli)


def test_row_chunks_cap_the_padded_tokens_with_few_shapes():
    from finllm_pl.backend.plain import row_chunks

    assert row_chunks(32, 64, None) == [slice(0, 32)] and row_chunks(32, 64, 2048) == [slice(0, 32)]
    assert row_chunks(32, 224, 3584) == [slice(0, 16), slice(16, 32)]  # 16 x 224 = 3,584
    assert row_chunks(13, 100, 450) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 13)]
    assert row_chunks(3, 500, 100) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # a row longer than the cap: alone
