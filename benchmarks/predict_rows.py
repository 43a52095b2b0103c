"""Labeling through the real CLI (`predict`): rows/s of the whole job, on the same GPU in the same run.

The DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights (the hub is unreachable) is saved to a temp
folder with the tokenizer from --tokenizer, with a LoRA adapter (r=4 on q/k/v/o, random A and B: a trained
adapter's shape, so folding it in changes the weights). Then `predict` runs configs/deepseek_r1_distill_qwen_1.5b_fast.yaml
on --data once per variant. Timed by predict itself (its last line), not model loading: rows/s from the first
batch to the finished output (reading, tokenizing, scoring and writing every row after the first batch), and apart
from it the wait for the first batch (Lightning fetches it before predict starts its clock), from when the loop asked
for it (workers that started in setup, while the model loaded, may have it ready; before 3b1a82c: from the stream's
creation, the GPU idle while the first chunks were read and tokenized; results files without first_batch_s exclude
that wait).
Prints a table and writes JSON; label agreement is against the first variant.

    python benchmarks/predict_rows.py --tokenizer DIR --data instruction_formatted_data.jsonl --out results/gpu/predict_rows.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from finllm_pl.__main__ import FinLLMCLI, cli_main  # noqa: E402
from finllm_pl.assets import build_random_qwen_1_5b  # noqa: E402
from finllm_pl.predict import PredictionWriter  # noqa: E402
from fit_epoch import GCClock, write_results  # noqa: E402  (benchmarks/ is on the path: the script's folder)

VARIANTS = {  # name: overrides of the fast config
    "rows1024": ["--data.eval_batch_size", "1024", "--data.eval_batch_tokens", "null"],
    "config": [],
    "merge": ["--model.dequantize_once", "true", "--model.merge_for_labeling", "true"],
}
# suffixes, in any order after the name: _w<N> (data.num_workers N), _ch<N> (data.predict_chunk_rows N),
# _tok<N> (data.eval_batch_tokens N), _nocomp (model.compile_layers false), _fl (model.fused_layers true),
# _nocudnn (SDPA without its cuDNN backend)


def overrides(name: str) -> tuple[list[str], bool]:
    """(CLI overrides, cuDNN attention off) of a variant name such as config_w4_nocomp."""
    base, *suffixes = name.split("_")
    args = list(VARIANTS[base])
    nocudnn = False
    for s in suffixes:
        if re.fullmatch(r"w\d+", s):
            args += ["--data.num_workers", s[1:]]
        elif re.fullmatch(r"ch\d+", s):
            args += ["--data.predict_chunk_rows", s[2:]]
        elif re.fullmatch(r"tok\d+", s):
            args += ["--data.eval_batch_tokens", s[3:]]
        elif s == "nocomp":
            args += ["--model.compile_layers", "false"]
        elif s == "fl":
            args += ["--model.fused_layers", "true"]
        elif s == "nocudnn":
            nocudnn = True
        else:
            raise SystemExit(f"unknown variant suffix _{s} in {name}")
    return args, nocudnn


class PredictProfiler(Callback):
    """torch.profiler over the predict loop (first batch to last): GPU busy fraction, top kernels and host ops
    (gpu_throughput.summarize_profile), and the GPU's longest idle gaps (where the wall time goes)."""

    def __init__(self, batches: int = 0):
        self.prof, self.t0, self.result = None, None, None
        self.batches = batches  # only the job's first this many batches (0: all)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.prof is not None and batch_idx + 1 == self.batches:
            self.on_predict_epoch_end(trainer, pl_module)

    def on_predict_epoch_start(self, trainer, pl_module):
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.prof.start()
        self.t0 = time.perf_counter()

    def on_predict_epoch_end(self, trainer, pl_module):
        from torch.autograd import DeviceType

        from gpu_throughput import summarize_profile

        if self.prof is None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        self.result = summarize_profile(self.prof, wall)
        spans = sorted((e.time_range.start, e.time_range.end) for e in self.prof.events()
                       if e.device_type == DeviceType.CUDA)
        gaps, end = [], spans[0][0] if spans else 0
        for st, en in spans:
            if st > end:
                gaps.append((st - end, end - spans[0][0]))
            end = max(end, en)
        self.result["gpu_gaps_over_2ms"] = {"count": sum(g > 2000 for g, _ in gaps),
                                            "total_ms": sum(g for g, _ in gaps if g > 2000) / 1e3,
                                            "largest": [{"ms": g / 1e3, "at_ms": at / 1e3}
                                                        for g, at in sorted(gaps, reverse=True)[:12]]}
        self.prof = None


class BatchTimeline(Callback):
    """Per batch, without a profiler (CUDA events, host clock): its rows and prompt width, when the host began it,
    how long the host spent in it (scoring launched, the previous batch written: host_write_ms includes the wait for
    its scores and the flush of finished chunks), the GPU's time on it (its first to
    its last kernel, idle stretches inside included), and how long the GPU sat idle before it. Where a job's wall
    time goes that the GPU does not use."""

    def __init__(self):
        self.marks = []
        self.host = {}  # host seconds of this batch by part (timed_parts), moved into its mark at batch end
        self.gc_clock, self.gc = GCClock(), {}

    def timed_parts(self):
        """Wraps, for one run, predict_step (launching the batch's scoring), the writer's wait for the previous
        batch's scores, its writing of them, and its flush (fsync) of finished chunks: host ms per batch."""
        from finllm_pl.module import FinLLM

        from torch.utils.data import DataLoader
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter as Workers

        originals = {(FinLLM, "predict_step"): FinLLM.predict_step, (PredictionWriter, "_write"): PredictionWriter._write,
                     (PredictionWriter, "_flush"): PredictionWriter._flush, (DataLoader, "__iter__"): DataLoader.__iter__,
                     (Workers, "__next__"): Workers.__next__,
                     (FinLLM, "on_predict_epoch_start"): FinLLM.on_predict_epoch_start}
        host = self.host

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    host[name] = host.get(name, 0.0) + time.perf_counter() - t
            return wrapper

        def write(writer, prediction, chunk):
            t = time.perf_counter()
            if "ready" in prediction:
                prediction["ready"].synchronize()
            host["wait"] = host.get("wait", 0.0) + time.perf_counter() - t
            return originals[(PredictionWriter, "_write")](writer, prediction, chunk)

        FinLLM.predict_step = timed("step", originals[(FinLLM, "predict_step")])
        DataLoader.__iter__ = timed("loader_iter", originals[(DataLoader, "__iter__")])  # (forks the workers)
        Workers.__next__ = timed("loader_next", originals[(Workers, "__next__")])  # (waits for a batch)
        FinLLM.on_predict_epoch_start = timed("epoch_hook", originals[(FinLLM, "on_predict_epoch_start")])
        PredictionWriter._write = timed("write", write)
        PredictionWriter._flush = timed("flush", originals[(PredictionWriter, "_flush")])
        return originals

    def on_predict_epoch_start(self, trainer, pl_module):
        from finllm_pl import kernels

        self.marks, self.t0 = [], time.perf_counter()
        self.before = {f"{k}_ms": round(v * 1e3, 2) for k, v in self.host.items()}  # (the first batch's wait)
        self.host.clear()
        compiler = kernels._COMPILER  # fused_layers' kernels still being compiled when labeling starts?
        self.compiling_at_start = compiler is not None and compiler.is_alive()
        warm_up = getattr(pl_module, "_warmup", None)  # the warm-up batch's thread still running?
        self.warming_up_at_start = warm_up is not None and warm_up.is_alive()
        self.gc_clock.start()
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self.marks.append({"rows": int(batch["prompt_ids"].shape[0]), "width": int(batch["prompt_ids"].shape[1]),
                           "host_start": time.perf_counter(), "start": start})

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.marks[-1].update(host_end=time.perf_counter(), end=end, parts=dict(self.host))
        self.host.clear()

    def on_predict_epoch_end(self, trainer, pl_module):
        self.gc = self.gc_clock.stop()

    def summary(self) -> dict:
        torch.cuda.synchronize()
        rows, prev = [], self.origin
        for m in self.marks:
            rows.append({"rows": m["rows"], "width": m["width"],
                         "host_start_ms": round((m["host_start"] - self.t0) * 1e3, 2),
                         "host_ms": round((m["host_end"] - m["host_start"]) * 1e3, 2),
                         "gpu_start_ms": round(self.origin.elapsed_time(m["start"]), 2),
                         "gpu_ms": round(m["start"].elapsed_time(m["end"]), 2),
                         "gpu_idle_before_ms": round(prev.elapsed_time(m["start"]), 2),
                         **{f"{k}_ms": round(v * 1e3, 2) for k, v in m.get("parts", {}).items()}})
            prev = m["end"]
        idle = [r["gpu_idle_before_ms"] for r in rows]
        parts = {f"host_{k}_ms": round(sum(r.get(f"{k}_ms", 0) for r in rows), 1) for k in ("step", "wait", "write", "flush", "loader_next", "epoch_hook")}
        return {"batches": len(rows), "compiling_at_start": self.compiling_at_start,
                "warming_up_at_start": self.warming_up_at_start, "gc": self.gc, "before_loop": self.before,
                "gpu_idle_between_batches_ms": round(sum(idle), 1), **parts,
                "gpu_idle_first_second_ms": round(sum(i for i, r in zip(idle, rows) if r["gpu_start_ms"] < 1000), 1),
                "per_batch": rows}


def make_adapter(model_dir: Path, out: Path) -> Path:
    from finllm_pl import model as hf

    base = hf.load_base_model(str(model_dir), "none", torch.bfloat16, torch.device("cuda"))
    peft_model = hf.add_lora(base, 4, 8, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out))
    del peft_model, base
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True, help="JSONL to label (the 13,173-row sentiment set)")
    ap.add_argument("--out", default="results/gpu/predict_rows.json")
    ap.add_argument("--repeat", type=int, default=1,
                    help="label --data this many times over in one job (a longer job: fixed costs amortised)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="copy each variant's output (<variant>.jsonl) here")
    ap.add_argument("--profile", action="store_true", help="profile each predict loop (slows it; for where time goes)")
    ap.add_argument("--profile-first", type=int, default=0, metavar="N",
                    help="with --profile: only the loop's start to the end of its N-th batch")
    ap.add_argument("--variants", default="config,merge", help=f"comma list of {', '.join(VARIANTS)}, each optionally "
                    "+ _w<N> (N workers), _ch<N> (chunk rows), _tok<N> (batch tokens), _nocomp (compile_layers off), "
                    "_fl (fused_layers on), _nocudnn (SDPA without cuDNN)")
    a = ap.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "data": os.path.abspath(a.data),
               "config": "configs/deepseek_r1_distill_qwen_1.5b_fast.yaml", "runs": []}
    labels = {}
    with tempfile.TemporaryDirectory(prefix="finllm_predict_") as tmp:
        model_dir = build_random_qwen_1_5b(Path(tmp) / "qwen1.5b", a.tokenizer)
        adapter = make_adapter(model_dir, Path(tmp) / "adapter")
        data = a.data
        if a.repeat > 1:
            data = str(Path(tmp) / f"x{a.repeat}.jsonl")
            Path(data).write_text(Path(a.data).read_text() * a.repeat)
        results["repeat"] = a.repeat
        for name in a.variants.split(","):
            extra, nocudnn = overrides(name)
            torch.backends.cuda.enable_cudnn_sdp(not nocudnn)  # _nocudnn: SDPA without its cuDNN backend
            out = Path(tmp) / f"{name}.jsonl"
            torch.cuda.reset_peak_memory_stats()
            args = ["predict", "--config", results["config"], "--model.model_name_or_path", str(model_dir),
                    "--ckpt_path", str(adapter), "--data.predict_path", data, "--data.predict_output", str(out),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra]
            prof, timeline = PredictProfiler(a.profile_first), BatchTimeline()
            before = FinLLMCLI.before_predict
            # the CLI's own predict run, with the timeline (and the profiler) among its callbacks
            FinLLMCLI.before_predict = lambda cli: (before(cli), cli.trainer.callbacks.append(timeline),
                                                    a.profile and cli.trainer.callbacks.append(prof))
            originals = timeline.timed_parts()
            t0 = time.perf_counter()
            try:
                cli = cli_main(args)
                job_s = time.perf_counter() - t0  # the whole command: model loading, labeling, report
            finally:
                FinLLMCLI.before_predict = before
                for (cls, attr), fn in originals.items():
                    setattr(cls, attr, fn)
            writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
            if a.keep:
                Path(a.keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(out, Path(a.keep) / out.name)
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            labels[name] = [r["label"] for r in rows]
            first = next(iter(labels))
            run = {"variant": name, "overrides": extra + (["(cuDNN attention off)"] if nocudnn else []), "rows": len(rows), **writer.speed, "job_s": job_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "label_agreement": sum(x == y for x, y in zip(labels[first], labels[name])) / len(rows)}
            run["timeline"] = timeline.summary()
            if prof.result is not None:
                from gpu_throughput import profile_text

                run["profile"] = prof.result
                print(profile_text(name, prof.result), "\n", json.dumps(prof.result["gpu_gaps_over_2ms"]), flush=True)
            results["runs"].append(run)
            write_results(a.out, results)  # (again after every variant: a run cut short keeps what it measured)
            print(f"{name}: {run['rows']} rows in {run['seconds']:.2f} s = {run['rows_s']:,.0f} rows/s (first batch "
                  f"after {run['first_batch_s'] or 0:.2f} s; the whole command {job_s:.2f} s), peak "
                  f"{run['peak_gib']:.2f} GiB, agreement with {first} {run['label_agreement']:.4f}; GPU idle between "
                  f"its {run['timeline']['batches']} batches {run['timeline']['gpu_idle_between_batches_ms']:.0f} ms "
                  f"({run['timeline']['gpu_idle_first_second_ms']:.0f} in the first second)", flush=True)
            del cli
            gc.collect()
            torch.cuda.empty_cache()
    lines = ["| variant | overrides of the fast config | rows | s | first batch s | rows/s | peak GiB | label agreement |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['rows']} | {r['seconds']:.2f} | "
              f"{r['first_batch_s'] or 0:.2f} | {r['rows_s']:,.0f} | {r['peak_gib']:.2f} | {r['label_agreement']:.4f} |"
              for r in results["runs"]]
    write_results(a.out, results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
