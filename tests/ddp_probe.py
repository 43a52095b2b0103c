"""Imported by the DDP subprocesses of test_ddp.py (tests/ is on their PYTHONPATH): a checkpoint IO that records
which rank wrote each checkpoint file (checkpoints must be written once, by rank 0), and the loss of every
optimizer step."""

import json
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback

from finllm_pl.callbacks import AtomicCheckpointIO


class RecordingCheckpointIO(AtomicCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
        with open(os.environ["FINLLM_TEST_SAVES"], "a") as f:
            f.write(f"{rank} {os.getpid()} {Path(path).name}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


class StepLosses(Callback):
    """Writes {optimizer step: {loss, grad_norm, lr}} as logged, as JSON to `path` at the end of fit (rank 0), and
    the val/* metrics each rank's callbacks see after validation to `path`.val<rank>."""

    def __init__(self, path: str) -> None:
        self.path, self.by_step = path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, logged = trainer.global_step, trainer.callback_metrics
        if step > 0 and step not in self.by_step and "train/loss" in logged:
            self.by_step[step] = {k: float(logged[f"train/{k}"]) for k in ("loss", "grad_norm", "lr")}

    def on_validation_end(self, trainer, pl_module) -> None:  # every rank: what a monitoring callback would see
        seen = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        Path(f"{self.path}.val{trainer.global_rank}").write_text(json.dumps(seen))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps(self.by_step))


class SaveAt(Callback):
    """Saves a checkpoint to `path` after micro-batch `batch` of the first epoch (every rank takes part, as in any
    save) and goes on training."""

    def __init__(self, batch: int, path: str) -> None:
        self.batch, self.path = batch, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
