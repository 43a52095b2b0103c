"""Callbacks and plugins the CLI installs: crash-safe checkpoint files, adapter export, validation reports."""

from __future__ import annotations

import os
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .errors import ConfigError, ModelError
from .files import atomic_file
from .metrics import write_report
from .model import load_checkpoint_file  # noqa: F401  (plain torch; re-exported for the CLI and tests)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsync'd and renamed: a kill during a save leaves the previous file
    intact, so `last.ckpt` is always complete. Loading is `weights_only=True` (no code runs from a checkpoint)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as f:
                torch.save(checkpoint, f)
        except OSError as e:  # disk full, folder gone read-only: the previous checkpoint is still intact
            raise ModelError(f"{path}: cannot write the checkpoint ({e.strerror or e}); free space or set "
                             "checkpoint.dirpath to a writable folder, then resume with --ckpt_path last") from None

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = True):
        return load_checkpoint_file(str(path), map_location)


class RunLogger(TensorBoardLogger):
    """TensorBoard (`default_hp_metric` off: no `hp_metric = -1` placeholder) whose folder and events file appear
    with the first thing written to it. Lightning touches `logger.experiment` while setting up, before the data is
    read and the model loads; a plain TensorBoardLogger then creates `version_N/events...` at once, and a run that
    fails on a bad row or setting leaves it behind. Here that touch gets a stand-in that makes the writer on first
    use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)

    @property
    def experiment(self):
        if self._experiment is None and self._experiment_or_none() is None:
            return _WriterOnFirstUse(self)
        return TensorBoardLogger.experiment.fget(self)

    def _experiment_or_none(self):
        from lightning.pytorch.utilities import rank_zero_only

        return None if rank_zero_only.rank == 0 else TensorBoardLogger.experiment.fget(self)  # (a dummy elsewhere)


class _WriterOnFirstUse:
    def __init__(self, logger: RunLogger) -> None:
        self._logger = logger

    def __getattr__(self, name: str):
        return getattr(TensorBoardLogger.experiment.fget(self._logger), name)


class RunConfig(SaveConfigCallback):
    """LightningCLI's config.yaml (the resolved config, in the run's log folder), saved when the run starts: fit
    at its first step, validate as its loop starts; not at setup (a run stopped by a bad row or a bad setting left
    one behind). predict saves none: its job record says what its output belongs to."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            super().setup(trainer, pl_module, "validate")


NOT_EMPTY = r"Checkpoint directory .* exists and is not empty\.$"


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (the CLI's `checkpoint` section), made for resuming after a kill:

      - `last.ckpt` is the final optimizer step when fit ends, however it ends: the last epoch, max_steps, early
        stopping, or Ctrl-C. (Lightning rewrites last.ckpt only when it writes a step checkpoint: a run of 36 steps
        with a checkpoint every 10 would leave last.ckpt at step 30.) A first Ctrl-C lets the accumulation window
        in progress finish, so the run stops at an optimizer step, then ends as a finished run does (last.ckpt,
        adapter export); a second Ctrl-C stops at once, as Python's default does.
      - it does not save again the step it resumed from. With manual optimization and gradient accumulation the
        global step stays put for a few micro-batches after a resume at a window boundary, and ModelCheckpoint
        does not restore the step it last saved: it would rewrite step=N.ckpt and last.ckpt at the first
        micro-batch with a mid-window state (valid, but not what an uninterrupted run writes);
      - resumed from a checkpoint of its own folder, it overwrites the step checkpoints a killed run wrote past the
        resume point (the same steps, redone exactly) instead of adding step=N-v1.ckpt copies beside them.
    Its state key stays ModelCheckpoint's, so the checkpoints written before keep resuming their callback state.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Lightning warns here when the folder holds files: expected when fit resumes from a checkpoint of this
        very folder. Which checkpoint fit resumes from is known only later (trainer.ckpt_path is set after setup),
        so that one warning waits for on_train_start, said there unless the run resumed from this folder."""
        if stage != "fit":
            return super().setup(trainer, pl_module, stage)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().setup(trainer, pl_module, stage)
        self._not_empty = None
        for w in caught:
            if re.match(NOT_EMPTY, str(w.message)):
                self._not_empty = str(w.message)
            else:  # anything else: said now, through the filters in force
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _resumes_here(self, trainer) -> bool:
        """Resumed from a checkpoint of its own folder."""
        return bool(trainer.ckpt_path and self.dirpath
                    and Path(trainer.ckpt_path).resolve().parent == Path(self.dirpath).resolve())

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        assert hasattr(self, "_last_global_step_saved") and hasattr(self, "_enable_version_counter"), \
            "lightning's ModelCheckpoint changed: review StepCheckpoint"
        self._last_global_step_saved = trainer.global_step
        if self._resumes_here(trainer):
            self._enable_version_counter = False
        elif getattr(self, "_not_empty", None):
            rank_zero_warn(self._not_empty)
        self._interrupted = False
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():  # (signal handlers: main thread only)
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)  # a second one: at once
        rank_zero_info("Ctrl-C: stopping at the end of this accumulation window (Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if getattr(pl_module, "window_open", False):
            return  # only between optimizer steps: a checkpoint then holds no partial window
        stop = self._interrupted
        if trainer.world_size > 1:  # every rank stops after the same step (a rank may have got the signal later)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        final = (trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
                 or (last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch))
        if final:  # saved here, at a batch end, where Lightning's loops know how to resume from
            self._save_final(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and trainer.should_stop and not trainer.sanity_checking:  # (early stopping)
            self._save_final(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()
        self._save_final(trainer)  # (a stop none of the above saw)
        super().on_train_end(trainer, pl_module)

    def _save_final(self, trainer) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()
        super().on_exception(trainer, pl_module, exception)

    def _restore_handler(self) -> None:
        if getattr(self, "_previous_handler", None) is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _monitor_candidates(self, trainer) -> dict[str, Any]:
        """Checkpoint names take `step` from here: always the optimizer step (validation logs a "step" value, the
        x value of its TensorBoard points, which Lightning would otherwise take for the name of later checkpoints)."""
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.global_step)
        return candidates

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


def _same_model(a: str, b: str) -> bool:
    if os.path.isdir(os.path.expanduser(a)) and os.path.isdir(os.path.expanduser(b)):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


def check_adapter_matches(path: str, ckpt: dict[str, Any], hp: Any) -> None:
    """A checkpoint resumes only into the base model and LoRA shape it was trained with (`hp`: model settings)."""
    meta = ckpt.get("finllm") or {}
    saved = meta.get("lora") or {}
    if not meta:
        return  # not ours: on_load_checkpoint says so
    want_targets = sorted(hp.lora_target_modules)
    if (_same_model(meta["base_model"], hp.model_name_or_path) and saved.get("r") == hp.lora_r
            and saved.get("alpha", hp.lora_alpha) == hp.lora_alpha and sorted(saved.get("target_modules", [])) == want_targets):
        return
    raise ModelError(
        f"{path}: checkpoint is an adapter for {meta['base_model']} with LoRA r={saved.get('r')} alpha="
        f"{saved.get('alpha')} on {saved.get('target_modules')}, but this run is {hp.model_name_or_path} with "
        f"r={hp.lora_r} alpha={hp.lora_alpha} on {list(hp.lora_target_modules)}; use the matching config"
    )


def check_writable_dir(path: str, key: str) -> None:
    """Fail before any work is done when the folder `path` (created later if missing) cannot be written."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={path}: {probe} is a file, not a folder; set {key} to a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: folder {probe} is not writable; set {key} to a folder you can write to")


def run_dir(trainer) -> str:
    """The run's log folder, read without `trainer.log_dir` (a collective: calling it on rank 0 alone hangs DDP)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    return (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir) \
        if logger else trainer.default_root_dir


def logged_step(trainer, pl_module) -> int:
    """The step TensorBoard puts a value at: the optimizer step (`trainer.global_step`) in fit; in validate the step
    of the checkpoint being validated (0 for an adapter folder or the untuned base)."""
    if trainer.state.fn == "fit":
        return trainer.global_step
    return int(getattr(pl_module, "_resumed_step", None) or 0)


def log_scalars(loggers, values: dict[str, Any], step: int) -> None:
    """`values` (numbers or 0-d tensors) to every logger at `step`, flushed as Lightning's own logging does."""
    if not loggers:
        return
    metrics = {k: float(v) for k, v in values.items()}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


class AdapterExport(Callback):
    """At the end of fit, write the adapter in PEFT format with the tokenizer, prompt format, resolved config and
    calibration. The folder loads with `PeftModel.from_pretrained(base, folder)` and is what `predict --ckpt_path`
    takes.

    - With `checkpoint.monitor` (e.g. val/f1_weighted, mode max) the exported adapter is the best checkpoint's, not
      the last step's: its LoRA weights are loaded first, and the prompt record and the log say which step.
    - With a validation set and `model.calibration` temperature / vector, the calibration is fitted on the
      validation rows' label scores of the exported weights and saved beside them (calibration.json, with the ECE,
      Brier and NLL before and after; a reliability diagram in the run's log folder, TensorBoard too).
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    def export_dir(self, trainer) -> Path:
        ckpt_cb = trainer.checkpoint_callback
        root = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else Path(trainer.default_root_dir)
        return root / self.dirname

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.interrupted:
            return
        chosen = self._load_best(trainer, pl_module)  # every rank: the calibration pass below uses the weights
        calibration = self._calibrate(trainer, pl_module, chosen)  # every rank takes part in its gather
        if trainer.global_rank != 0:
            return
        from .export import prompt_record
        from .model import export_adapter

        dm = trainer.datamodule
        prompt = prompt_record(dm.build_formatter(), dm.hparams, pl_module.hparams)
        if chosen:
            prompt["checkpoint"] = chosen
        cfg_file = Path(run_dir(trainer), "config.yaml")
        config = cfg_file.read_text() if cfg_file.exists() else None
        extra = {"calibration.json": calibration.to_json()} if calibration is not None else {}
        out = export_adapter(pl_module.model, dm.formatter.tokenizer, str(self.export_dir(trainer)), prompt, config,
                             extra)
        where = f" (the best checkpoint: step {chosen['step']}, {chosen['monitor']} {chosen['value']:.4f}; the last " \
                f"step was {trainer.global_step})" if chosen else ""
        rank_zero_info(f"adapter exported to {out}{where}")

    @staticmethod
    def _load_best(trainer, pl_module) -> Optional[dict[str, Any]]:
        cb = trainer.checkpoint_callback
        best = getattr(cb, "best_model_path", "") if cb is not None and getattr(cb, "monitor", None) else ""
        if not best or not os.path.isfile(best):
            return None
        ckpt = load_checkpoint_file(best)
        chosen = {"step": int(ckpt["global_step"]), "monitor": cb.monitor, "value": float(cb.best_model_score),
                  "path": best}
        if chosen["step"] != trainer.global_step:
            pl_module.load_state_dict(ckpt["state_dict"], strict=False)  # (the adapter only; on_load_checkpoint
            pl_module.backend.weights_changed()                           # checked its keys when it was saved)
        return chosen

    @staticmethod
    def _calibrate(trainer, pl_module, chosen):
        kind = pl_module.hparams.get("calibration", "none")
        dm = trainer.datamodule
        if kind == "none" or getattr(dm, "val_set", None) is None:
            return None
        from .calibration import Calibration, write_reliability_png

        loader = dm.val_dataloader()
        # the rows validation itself looks at: trainer.limit_val_batches (int: batches, float: a fraction; 0: none)
        limit = trainer.limit_val_batches
        batches = int(limit) if isinstance(limit, int) else int(len(loader) * limit)
        if batches == 0:
            rank_zero_info(f"calibration ({kind}) skipped: trainer.limit_val_batches=0 leaves no validation rows")
            return None
        found = pl_module.validation_scores(loader, batches)
        if found is None or trainer.global_rank != 0:
            return None
        scores, gold = found
        step = chosen["step"] if chosen else trainer.global_step
        calibration = Calibration.fit(scores, gold, kind, source=f"validation set, {len(gold)} rows, step {step}",
                                      label_names=list(pl_module.hparams.labels))
        b, a = calibration.before, calibration.after
        png = Path(run_dir(trainer), "calibration_reliability.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        write_reliability_png(png, calibration.apply(scores).exp(), gold, title=f"after {kind} scaling (validation)")
        log_scalars(trainer.loggers, {"calibration/ece_before": b["ece"], "calibration/ece_after": a["ece"],
                                      "calibration/brier_before": b["brier"], "calibration/brier_after": a["brier"]},
                    step)
        rank_zero_info(f"calibration ({kind}) on {len(gold)} validation rows: ECE {b['ece']:.4f} -> {a['ece']:.4f}, "
                       f"Brier {b['brier']:.4f} -> {a['brier']:.4f} (saved beside the adapter; {png})")
        return calibration


class ValidationReport(Callback):
    """After each validation: accuracy / F1 / per-class / confusion matrix as JSON + Markdown + PNG in the run's
    log folder (or `out_dir`: validate's <run>/eval/validate-<time>/), and the confusion matrix as an image in
    TensorBoard."""

    SAMPLES = 8  # validation rows shown in TensorBoard (text, gold, predicted, probabilities)

    def __init__(self, out_dir: Optional[str] = None) -> None:
        self.out_dir = out_dir
        self._samples: Optional[str] = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """The first batch's first rows, scored again (one batch: validation_step keeps no scores) for the table."""
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or trainer.global_rank != 0 \
                or not trainer.loggers:
            return
        keep = (batch["gold"] >= 0).nonzero().flatten()[: self.SAMPLES].tolist()
        if not keep:
            return
        with torch.no_grad(), pl_module.backend.labeling():
            probs = torch.softmax(pl_module.backend.score(batch).float(), -1).cpu()
        labels = list(pl_module.hparams.labels)
        tok = pl_module.tokenizer
        # the prompt around the input text, to show the input alone (a row with its own instruction: all of it)
        marker = "\ue000"
        around = trainer.datamodule.build_formatter().render(trainer.datamodule.hparams.get("instruction") or "",
                                                              marker).split(marker)
        rows = ["| text | gold | predicted | " + " | ".join(f"p({lab})" for lab in labels) + " |",
                "|---" * (3 + len(labels)) + "|"]
        for j in keep:
            text = tok.decode(batch["prompt_ids"][j][batch["prompt_mask"][j].bool()].tolist())
            if len(around) == 2 and around[0] in text and text.endswith(around[1]):
                text = text[text.index(around[0]) + len(around[0]):len(text) - len(around[1])]
            text = " ".join(text.replace("|", "\\|").split())
            text = text[:160] + ("..." if len(text) > 160 else "")
            p = probs[j].tolist()
            rows.append(f"| {text} | {labels[int(batch['gold'][j])]} | {labels[p.index(max(p))]} | "
                        + " | ".join(f"{v:.3f}" for v in p) + " |")
        self._samples = "\n".join(rows)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or not hasattr(pl_module, "last_report"):
            return
        report = dict(pl_module.last_report)
        report["rows"] = report["support"]
        if trainer.ckpt_path:
            report["checkpoint"] = str(trainer.ckpt_path)
        report["step"] = trainer.global_step
        out_dir = self.out_dir or run_dir(trainer)
        paths = write_report(report, out_dir)
        from .metrics import confusion_figure

        step = logged_step(trainer, pl_module)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_figure"):
                exp.add_figure("val/confusion_matrix", confusion_figure(report), global_step=step)
            if hasattr(exp, "add_text") and getattr(self, "_samples", None):
                exp.add_text("val/samples", self._samples, global_step=step)
        self._samples = None
        rank_zero_info(f"validation: accuracy {report['accuracy']:.4f}, macro-F1 {report['f1_macro']:.4f}, "
                       f"weighted-F1 {report['f1_weighted']:.4f} -> {paths[1]}")
