"""Callbacks and plugins the CLI installs: crash-safe checkpoint files, adapter export, validation reports."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from .errors import ModelError
from .metrics import write_report


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsync'd and renamed: a kill during a save leaves the previous file
    intact, so `last.ckpt` is always complete. Loading is `weights_only=True` (no code runs from a checkpoint)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = True):
        return load_checkpoint_file(str(path), map_location)


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such checkpoint file; check --ckpt_path (or use 'last')")
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ModelError(
            f"{path}: checkpoint is corrupted or not a checkpoint ({str(e).splitlines()[0][:120]}); "
            "resume from another one (checkpoints/<run>/*.ckpt)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelError(f"{path}: not a Lightning checkpoint (no state_dict); give a .ckpt written by fit")
    return ckpt


def run_dir(trainer) -> str:
    """The run's log folder, read without `trainer.log_dir` (a collective: calling it on rank 0 alone hangs DDP)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    return (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir) \
        if logger else trainer.default_root_dir


class AdapterExport(Callback):
    """At the end of fit, write the adapter in PEFT format with the tokenizer, prompt format and resolved config.

    The folder loads with `PeftModel.from_pretrained(base, folder)` and is what `predict --ckpt_path` takes.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    def export_dir(self, trainer) -> Path:
        ckpt_cb = trainer.checkpoint_callback
        root = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else Path(trainer.default_root_dir)
        return root / self.dirname

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.interrupted:
            return
        from .export import prompt_record
        from .model import export_adapter

        dm = trainer.datamodule
        prompt = prompt_record(dm.build_formatter(), dm.hparams, pl_module.hparams)
        config = None
        cfg_file = Path(run_dir(trainer), "config.yaml")
        if cfg_file.exists():
            config = cfg_file.read_text()
        out = export_adapter(pl_module.model, dm.formatter.tokenizer, str(self.export_dir(trainer)), prompt, config)
        rank_zero_info(f"adapter exported to {out}")


class ValidationReport(Callback):
    """After each validation: accuracy / F1 / per-class / confusion matrix as JSON + Markdown + PNG in the run's
    log folder, and the confusion matrix as an image in TensorBoard."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or not hasattr(pl_module, "last_report"):
            return
        report = dict(pl_module.last_report)
        report["rows"] = report["support"]
        if trainer.ckpt_path:
            report["checkpoint"] = str(trainer.ckpt_path)
        report["step"] = trainer.global_step
        out_dir = run_dir(trainer)
        paths = write_report(report, out_dir)
        from .metrics import confusion_figure

        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_figure"):
                exp.add_figure("val/confusion_matrix", confusion_figure(report), global_step=trainer.global_step)
        rank_zero_info(f"validation: accuracy {report['accuracy']:.4f}, macro-F1 {report['f1_macro']:.4f}, "
                       f"weighted-F1 {report['f1_weighted']:.4f} -> {paths[1]}")
