"""One real training epoch through the CLI, with and without model.cuda_graphs, on the same GPU in the same run.

The DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights (the hub is unreachable) is saved to a temp
folder with the tokenizer from --tokenizer, then `fit` runs configs/deepseek_r1_distill_qwen_1.5b_fast.yaml on
--data for one epoch per variant (no validation, no mid-run checkpoints). Timed: the training epoch itself
(train-epoch start to end hooks: every step, data loading and, for graphs, every capture), not model loading or
tokenization. Prints a table and writes JSON.

    python benchmarks/fit_epoch.py --tokenizer DIR --data instruction_formatted_data.jsonl --out results/gpu/fit_epoch.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from finllm_pl.__main__ import cli_main  # noqa: E402
from finllm_pl.assets import build_random_qwen_1_5b  # noqa: E402


class EpochClock(Callback):
    """Wall time of the training epoch and the per-step losses."""

    def __init__(self):
        self.t0 = self.seconds = None
        self.losses = {}

    def on_train_epoch_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and "train/loss" in trainer.callback_metrics:
            self.losses.setdefault(trainer.global_step, float(trainer.callback_metrics["train/loss"]))

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True, help="instruction JSONL (the 13,173-row sentiment set)")
    ap.add_argument("--out", default="results/gpu/fit_epoch.json")
    ap.add_argument("--variants", default="eager,graphs",
                    help="comma list of eager | graphs, optionally _m<micro>x<accumulation> (default: the config's 32x1)")
    a = ap.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "data": os.path.abspath(a.data),
               "config": "configs/deepseek_r1_distill_qwen_1.5b_fast.yaml", "runs": []}
    with tempfile.TemporaryDirectory(prefix="finllm_epoch_") as tmp:
        model_dir = build_random_qwen_1_5b(Path(tmp) / "qwen1.5b", a.tokenizer)
        for name in a.variants.split(","):
            mode, _, shape = name.partition("_m")
            micro, _, accum = shape.partition("x") if shape else ("32", "", "1")
            clock = EpochClock()
            torch.cuda.reset_peak_memory_stats()
            cli = cli_main(["--config", results["config"], "--model.model_name_or_path", str(model_dir),
                            "--data.train_path", a.data, "--data.val_fraction", "0", "--trainer.max_epochs", "1",
                            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                            "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", f"{tmp}/{name}",
                            "--checkpoint.dirpath", f"{tmp}/{name}", "--checkpoint.every_n_train_steps", "100000",
                            "--data.batch_size", micro, "--model.accumulate_grad_batches", accum,
                            "--model.cuda_graphs", str(mode == "graphs").lower()], run=False)
            cli.trainer.callbacks.append(clock)
            cli.trainer.fit(cli.model, cli.datamodule)
            g = cli.model._graphed
            run = {"variant": name, "micro": int(micro), "accumulation": int(accum), "epoch_s": clock.seconds, "steps": cli.trainer.global_step,
                   "rows": len(cli.datamodule.train_set), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "graphs_captured": len(g.graphs) if g is not None else 0,
                   "losses": [round(clock.losses[k], 4) for k in sorted(clock.losses)]}
            results["runs"].append(run)
            print(f"{name}: epoch {run['epoch_s']:.1f} s, {run['steps']} steps, peak {run['peak_gib']:.2f} GiB, "
                  f"graphs {run['graphs_captured']}", flush=True)
            del cli
            torch.cuda.empty_cache()
    base = next((r for r in results["runs"] if r["variant"] == "eager"), None)
    lines = ["| variant | s/epoch | steps | peak GiB | CUDA graphs | x eager | mean loss, last 20 steps |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        r["x_eager"] = base["epoch_s"] / r["epoch_s"] if base else None
        tail = r["losses"][-20:]
        lines.append(f"| {r['variant']} | {r['epoch_s']:.1f} | {r['steps']} | {r['peak_gib']:.2f} | "
                     f"{r['graphs_captured']} | {'-' if r['x_eager'] is None else format(r['x_eager'], '.2f')} | "
                     f"{sum(tail) / max(len(tail), 1):.4f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
