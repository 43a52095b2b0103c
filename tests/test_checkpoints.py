"""The final state is saved: last.ckpt is the run's last optimizer step however fit ends, a finished run resumed
says so, a raised max_steps continues on the new schedule, and Ctrl-C stops at a window boundary."""

import logging
import os
import signal

import pytest
import torch
from lightning.pytorch import Callback

from finllm_pl.__main__ import cli_main

# 7 micro-batches per epoch at accumulation 2: 4 optimizer steps per epoch, 8 in all; a step checkpoint every 3
BASE = ["--config", "configs/smoke.yaml", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "7",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar",
        "false", "--trainer.logger", "false", "--data.batch_size", "4", "--model.warmup_steps", "2",
        "--checkpoint.every_n_train_steps", "3"]


class LRs(Callback):
    """The LR each optimizer step used (logged as train/lr), by the step count after it."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "train/lr" in trainer.callback_metrics and trainer.global_step not in self.by_step:
            self.by_step[trainer.global_step] = float(trainer.callback_metrics["train/lr"])


def _fit(args, callbacks=(), ckpt_path=None):
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _lora(cli):
    return {f"model.{k}": v.detach().clone() for k, v in cli.model.model.named_parameters() if v.requires_grad}


def _assert_same(state, ref):
    assert state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(state[k], ref[k]), k


def test_last_ckpt_is_the_final_optimizer_step(workdir):
    """Fails on Lightning's own rule (last.ckpt only beside a step checkpoint): it was left at step 6 of 8."""
    cli = _fit(BASE)
    assert cli.trainer.global_step == 8
    last = torch.load("checkpoints/smoke/last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    _assert_same(last["state_dict"], _lora(cli))
    assert sorted(f for f in os.listdir("checkpoints/smoke") if f.endswith(".ckpt")) == [
        "last.ckpt", "step=000003.ckpt", "step=000006.ckpt"]


def test_a_finished_run_resumed_from_last_says_so_and_trains_nothing(workdir, caplog):
    cli = _fit(BASE)
    done = _lora(cli)
    with caplog.at_level(logging.INFO):
        again = _fit(BASE, ckpt_path="checkpoints/smoke/last.ckpt")
    assert again.trainer.global_step == 8
    assert "this run had already finished (step 8); nothing was trained" in caplog.text
    _assert_same(_lora(again), done)
    assert torch.load("checkpoints/smoke/last.ckpt", weights_only=True)["global_step"] == 8


def test_raising_max_steps_continues_on_the_new_schedule(workdir):
    """The LR of the first step after the resume is the new schedule's (the saved optimizer state holds the old
    schedule's final LR: 0.0 after its linear decay, which the resumed run used before)."""
    _fit(BASE + ["--trainer.max_steps", "4"])
    lrs = LRs()
    cli = _fit(BASE + ["--trainer.max_steps", "8"], [lrs], ckpt_path="checkpoints/smoke/last.ckpt")
    assert cli.trainer.global_step == 8
    schedule, peak = cli.model.schedule, cli.model.hparams.learning_rate
    assert schedule.total_steps == 8 and sorted(lrs.by_step) == [5, 6, 7, 8]
    for step, lr in lrs.by_step.items():  # (the step count after the step that used it)
        assert lr == pytest.approx(peak * schedule.factor(step - 1), rel=1e-6), step
    assert lrs.by_step[5] > 0


class InterruptAt(Callback):
    """Sends this process a SIGINT (as Ctrl-C does) at the start of micro-batch `n` of the first epoch."""

    def __init__(self, n):
        self.n = n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.n:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_at_the_window_boundary_and_saves_it(workdir):
    """Ctrl-C during the first micro-batch of the window [2, 3] lets it finish: the run stops after step 2 with
    last.ckpt and the exported adapter both at that step, and the handler is Python's again afterwards."""
    before = signal.getsignal(signal.SIGINT)
    cli = _fit(BASE, [InterruptAt(2)])
    assert cli.trainer.global_step == 2 and not cli.trainer.interrupted
    last = torch.load("checkpoints/smoke/last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and "window" not in last["finllm"]  # no partial window in it
    _assert_same(last["state_dict"], _lora(cli))
    assert os.path.isfile("checkpoints/smoke/adapter/adapter_model.safetensors")
    assert signal.getsignal(signal.SIGINT) is before


def test_validation_during_fit_equals_a_fresh_validate_of_the_same_weights(workdir):
    """fit's last validation (after its last optimizer step, fused AdamW and all) gives exactly what a fresh
    `validate` of last.ckpt gives. Before, labeling's cached LoRA matrices were keyed on the tensors' version
    counters, which fused AdamW does not bump: the second epoch's validation scored the first epoch's adapter
    (CPU smoke run: val/loss 2.1795 in fit, 2.0375 fresh)."""
    args = BASE + ["--trainer.limit_val_batches", "2"]
    cli = _fit(args)
    in_fit = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert cli.model.backend.on["lora_groups"]  # (the cached path ran)
    fresh = cli_main(["validate", *args, "--ckpt_path", "checkpoints/smoke/last.ckpt"])
    again = {k: float(v) for k, v in fresh.trainer.callback_metrics.items() if k.startswith("val/")}
    assert set(again) == set(in_fit) and in_fit["val/loss"] > 0
    for k in in_fit:
        assert again[k] == pytest.approx(in_fit[k], rel=1e-6), k
