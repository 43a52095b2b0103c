"""Imported by the DDP subprocesses of test_ddp.py and test_multinode.py (tests/ is on their PYTHONPATH): a
checkpoint IO that records which rank wrote each checkpoint file (checkpoints must be written once, by rank 0), the
loss of every optimizer step, and (NodeProbe) every file each process of each node writes."""

import json
import os
import sys
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

class NodeProbe(Callback):
    """For subprocess runs only (a Python audit hook cannot be removed): records, one line per event, every file
    this process opens for writing, creates, renames or copies under the working folder, with the process's node
    (torchrun's GROUP_RANK), global rank and local rank, to `path`.<pid>; and the topology the Trainer saw (cluster
    environment, node_rank, global_rank, local_rank, world_size) at setup. test_multinode.py reads it to tell which
    process of which node wrote what: rank-0-only outputs must come from global rank 0 alone, not from each node's
    local rank 0. (Files that native code writes, e.g. safetensors, are not seen; the temp folder they go to is.)"""

    EVENTS = {"open", "os.rename", "os.mkdir", "shutil.copyfile", "os.link", "os.symlink", "os.truncate"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, path: str) -> None:
        self.root = os.path.realpath(os.getcwd())
        env = os.environ
        self.who = {"node": env.get("GROUP_RANK"), "rank": env.get("RANK"), "local": env.get("LOCAL_RANK"),
                    "pid": os.getpid()}
        self._out = open(f"{path}.{os.getpid()}", "a", buffering=1)  # opened before the hook: writes to it are silent
        sys.addaudithook(self._hook)

    def _record(self, **fields) -> None:
        self._out.write(json.dumps({**self.who, **fields}) + "\n")

    def _hook(self, event, args) -> None:
        if event not in self.EVENTS:
            return
        if event == "open":
            path, mode, flags = args
            if not (isinstance(mode, str) and any(c in mode for c in "wax+")) and not (flags or 0) & self.WRITE_FLAGS:
                return
            targets = [path]
        elif event in ("os.rename", "shutil.copyfile", "os.link", "os.symlink"):
            targets = [args[1]]
        else:
            targets = [args[0]]
        for t in targets:
            if isinstance(t, (str, bytes, os.PathLike)):
                p = os.path.realpath(os.fsdecode(t))
                if p.startswith(self.root + os.sep):
                    self._record(event=event, path=os.path.relpath(p, self.root))

    def setup(self, trainer, pl_module, stage) -> None:
        self._record(event="topology", environment=type(trainer.strategy.cluster_environment).__name__,
                     num_nodes=trainer.num_nodes, node_rank=trainer.node_rank, global_rank=trainer.global_rank,
                     local_rank=trainer.local_rank, world_size=trainer.world_size)
