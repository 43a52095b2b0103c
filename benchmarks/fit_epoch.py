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
import gc
import json
import os
import re
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


class GCClock:
    """Python's garbage collections while started: a long one holds the host while the GPU runs out of work."""

    def __init__(self):
        self.collections, self.ms, self.max_ms, self._t = 0, 0.0, 0.0, None

    def _clock(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            ms = (time.perf_counter() - self._t) * 1e3
            self.collections, self.ms, self.max_ms = self.collections + 1, self.ms + ms, max(self.max_ms, ms)

    def start(self):
        self.collections, self.ms, self.max_ms, self._t = 0, 0.0, 0.0, None
        if self._clock not in gc.callbacks:
            gc.callbacks.append(self._clock)

    def stop(self) -> dict:
        if self._clock in gc.callbacks:
            gc.callbacks.remove(self._clock)
        return {"collections": self.collections, "ms": self.ms, "max_ms": self.max_ms}


class EpochClock(Callback):
    """Wall time of each training epoch and the per-step losses."""

    def __init__(self):
        self.t0 = None
        self.seconds = []
        self.losses = {}
        self.first_step_s = None
        self.gc_ms = []  # Python's garbage collections in each epoch (ms together): host stalls
        self.gc = GCClock()

    def on_train_epoch_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.gc.start()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and not self.seconds:  # the first step: compiling (or loading compiled code) and a capture
            torch.cuda.synchronize()
            self.first_step_s = time.perf_counter() - self.t0
        if trainer.global_step > 0 and "train/loss" in trainer.callback_metrics:  # a device tensor: read it later,
            self.losses.setdefault(trainer.global_step, trainer.callback_metrics["train/loss"])  # not wait for it now

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.t0)
        self.gc_ms.append(self.gc.stop()["ms"])
        self.losses = {k: float(v) for k, v in self.losses.items()}


VARIANT = re.compile(r"(?P<mode>eager|graphs)(?:_m(?P<micro>\d+)x(?P<accum>\d+))?(?P<noprefix>_noprefix)?(?P<once>_once)?(?:_w(?P<workers>\d+))?(?:_c(?P<chunk>\d+))?(?P<nocomp>_nocomp)?(?P<fl>_fl)?(?P<nocudnn>_nocudnn)?")


class CaptureClock:
    """Wall time of each CUDA-graph capture (the shape's eager step + the capture itself, synced), and the host
    time of each of the two passes inside it, while installed (the capture's pass runs no kernels)."""

    def __init__(self):
        from finllm_pl.graphs import GraphedLossBackward

        self.cls, self.runs = GraphedLossBackward, []
        self.capture, self.passes = self.cls._capture, self.cls._loss_and_grads
        clock = self

        def capture(g, key, st):
            torch.cuda.synchronize()
            t0, clock.current = time.perf_counter(), []
            out = clock.capture(g, key, st)
            torch.cuda.synchronize()
            clock.runs.append({"shape": [list(key[0]), key[1]], "s": round(time.perf_counter() - t0, 4),
                               "passes_host_s": [round(x, 4) for x in clock.current]})
            clock.current = None
            return out

        def passes(g, st):
            t0 = time.perf_counter()
            out = clock.passes(g, st)
            if clock.current is not None:
                clock.current.append(time.perf_counter() - t0)
            return out

        self.current = None
        self.cls._capture, self.cls._loss_and_grads = capture, passes

    def remove(self):
        self.cls._capture, self.cls._loss_and_grads = self.capture, self.passes


class StepProfiler(Callback):
    """torch.profiler over `steps` training batches of the last epoch (after its first 20): GPU busy fraction,
    top kernels and host ops (benchmarks/gpu_throughput.py's summary)."""

    def __init__(self, steps: int):
        self.steps, self.prof, self.t0, self.result = steps, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == trainer.max_epochs - 1 and batch_idx == 20 and self.steps:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.start()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is not None and batch_idx == 20 + self.steps - 1:
            from gpu_throughput import summarize_profile

            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.stop()
            self.result = summarize_profile(self.prof, wall)
            self.result["batches"] = self.steps
            self.prof = None


def write_results(out: str, results: dict, table: list[str] = ()) -> None:
    """The JSON results file (written again as variants finish), then the table, printed last."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    if table:
        print("\n".join(table))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True, help="instruction JSONL (the 13,173-row sentiment set)")
    ap.add_argument("--out", default="results/gpu/fit_epoch.json")
    ap.add_argument("--variants", default="eager,graphs",
                    help="comma list of (eager|graphs)[_m<micro>x<accumulation>][_noprefix][_once][_w<workers>][_c<chunk_tokens>][_nocomp][_fl][_nocudnn]: "
                         "the config's settings unless a part overrides them (noprefix: data.shared_prefix 0; once: "
                         "model.dequantize_once; c: model.chunk_tokens; nocomp: model.compile_layers false; fl: model.fused_layers true; nocudnn: cuDNN attention off)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per variant; each is timed (the first captures)")
    ap.add_argument("--limit-batches", type=int, default=None, help="micro-batches per epoch (default: all)")
    ap.add_argument("--profile-steps", type=int, default=0, help="profile this many batches of the last epoch")
    ap.add_argument("--no-capture-clock", dest="capture_clock", action="store_false",
                    help="do not time each capture (its clock waits for the GPU before and after each one, which "
                         "the step itself need not)")
    a = ap.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "data": os.path.abspath(a.data),
               "config": "configs/deepseek_r1_distill_qwen_1.5b_fast.yaml", "runs": []}
    with tempfile.TemporaryDirectory(prefix="finllm_epoch_") as tmp:
        model_dir = build_random_qwen_1_5b(Path(tmp) / "qwen1.5b", a.tokenizer)
        for name in a.variants.split(","):
            m = VARIANT.fullmatch(name)
            if not m:
                ap.error(f"--variants: cannot read {name!r}")
            over = ["--model.cuda_graphs", str(m["mode"] == "graphs").lower()]
            if m["micro"]:
                over += ["--data.batch_size", m["micro"], "--model.accumulate_grad_batches", m["accum"]]
            if m["noprefix"]:
                over += ["--data.shared_prefix", "0"]
            if m["workers"]:
                over += ["--data.num_workers", m["workers"]]
            if m["once"]:
                over += ["--model.dequantize_once", "true"]
            if m["nocomp"] or m["mode"] == "eager":  # (compile_layers works inside the CUDA-graph step only)
                over += ["--model.compile_layers", "false"]
            if m["fl"]:
                over += ["--model.fused_layers", "true"]
            if m["chunk"]:
                over += ["--model.chunk_tokens", m["chunk"]]
            if a.limit_batches:
                over += ["--trainer.limit_train_batches", str(a.limit_batches)]
            clock, prof = EpochClock(), StepProfiler(a.profile_steps)
            torch.cuda.reset_peak_memory_stats()
            args = ["--config", results["config"], "--model.model_name_or_path", str(model_dir),
                    "--data.train_path", a.data, "--data.val_fraction", "0", "--trainer.max_epochs", str(a.epochs),
                    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", f"{tmp}/{name}",
                    "--checkpoint.dirpath", f"{tmp}/{name}", "--checkpoint.every_n_train_steps", "100000", *over]
            captures = CaptureClock() if a.capture_clock else None
            cli = cli_main(args, run=False)
            cli.trainer.callbacks.extend([clock, prof])
            cudnn = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(not m["nocudnn"] and cudnn)
            try:
                cli.trainer.fit(cli.model, cli.datamodule)
            finally:
                if captures is not None:
                    captures.remove()
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
            g, dm = cli.model._graphed, cli.datamodule
            tokens = sum(dm.train_set["length"])
            supervised = sum(len(lab) - lab.count(-100) for lab in dm.train_set["labels"])
            run = {"variant": name, "micro": dm.hparams.batch_size, "accumulation": cli.model.hparams.accumulate_grad_batches,
                   "shared_prefix": dm.hparams.shared_prefix, "num_workers": dm.hparams.num_workers,
                   "epoch_s": clock.seconds[0], "epochs_s": clock.seconds, "steps": cli.trainer.global_step,
                   "rows": len(dm.train_set), "tokens_per_epoch": tokens, "supervised_per_epoch": supervised, "tok_s": tokens / clock.seconds[0],
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "graphs_captured": len(g.graphs) if g is not None else 0,
                   "first_step_s": clock.first_step_s, "gc_ms": [round(x, 1) for x in clock.gc_ms], "captures": captures.runs if captures else None,
                   "captures_s": sum(c["s"] for c in captures.runs) if captures else None,
                   "losses": [round(clock.losses[k], 4) for k in sorted(clock.losses)]}
            if prof.result is not None:
                from gpu_throughput import profile_text

                run["profile"] = prof.result
                print(profile_text(name, prof.result), flush=True)
            results["runs"].append(run)
            print(f"{name}: epochs {[round(x, 1) for x in run['epochs_s']]} s, {run['steps']} steps, peak "
                  f"{run['peak_gib']:.2f} GiB, graphs {run['graphs_captured']} (captures "
                  f"{'-' if captures is None else format(run['captures_s'], '.1f')} s, first step "
                  f"{run['first_step_s']:.1f} s), garbage collections {run['gc_ms']} ms", flush=True)
            write_results(a.out, results)  # so far: a later variant may run out of time
            if g is not None:  # the graphs hold their memory pool: free it before the next variant
                g.graphs.clear()
                g.pool = None
            del cli, g, dm
            gc.collect()
            torch.cuda.empty_cache()
    base = next((r for r in results["runs"] if r["variant"] == "eager"), None)
    lines = ["| variant | micro x accum | s/epoch (1st) | later epochs | tokens/s (1st) | steps | peak GiB | graphs "
             "| x eager | mean loss, last 20 steps | max abs loss diff vs eager |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        r["x_eager"] = base["epoch_s"] / r["epoch_s"] if base else None
        both = list(zip(base["losses"], r["losses"])) if base else []
        r["max_loss_diff_vs_eager"] = max((abs(x - y) for x, y in both), default=None)
        tail = r["losses"][-20:]
        lines.append(f"| {r['variant']} | {r['micro']} x {r['accumulation']} | {r['epoch_s']:.1f} | "
                     f"{', '.join(format(x, '.1f') for x in r['epochs_s'][1:]) or '-'} | {r['tok_s']:,.0f} | "
                     f"{r['steps']} | {r['peak_gib']:.2f} | {r['graphs_captured']} | "
                     f"{'-' if r['x_eager'] is None else format(r['x_eager'], '.2f')} | "
                     f"{sum(tail) / max(len(tail), 1):.4f} | "
                     f"{'-' if r['max_loss_diff_vs_eager'] is None else format(r['max_loss_diff_vs_eager'], '.4f')} |")
    write_results(a.out, results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
