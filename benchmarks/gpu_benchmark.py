"""The speed benchmark in one call: the usual peft recipe against this project's fast config, on one GPU.

Model: the DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights, NF4 + LoRA r=4 on q/k/v/o, loaded
through the project's own path; data: the 13,173-row sentiment set tokenized by the project (--tokenizer: any
tokenizer folder; the table says how many tokens a row has). Each step runs in its own process with its own empty
compile caches (inductor, Triton, torch's NVRTC kernels), as on a machine that never compiled before, so no step
warms another up:

1. baseline: the tutorial recipe (prepare_model_for_kbit_training with gradient checkpointing, micro-batch 4 x
   accumulation 8, bf16 autocast, full-vocabulary loss, no length grouping), a few optimizer steps extrapolated
   to an epoch; and labeling by `generate` (gpu_throughput.py).
2. equal: the project's eager step against the fast step (CUDA graphs, fused norms/MLPs, shared prefix) on the
   same first batches of the same run: per-step losses (fit_epoch.py --variants eager,graphs).
3. fast: two real epochs of configs/deepseek_r1_distill_qwen_1.5b_fast.yaml through the CLI (fit_epoch.py); the
   first includes every one-time cost (compiling kernels, capturing the CUDA graphs).
4. predict: the whole `predict` job of the fast config on the set, and on the set 12 times over (predict_rows.py):
   rows/s from the first batch, the wait for that batch, and the two together.

Prints the tables last and writes JSON (--out; the steps' own JSON files beside it, in <out stem>/).

    python benchmarks/gpu_benchmark.py --tokenizer DIR --data instruction_formatted_data.jsonl --out results/gpu/benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(a) -> dict[str, list[str]]:
    """Each step's command line (benchmarks/ scripts), by name."""
    common = ["--tokenizer", a.tokenizer, "--data", a.data]
    return {
        "baseline": ["gpu_throughput.py", *common, "--variants", "baseline,generate_b64", "--label-jobs", "generate_b64",
                     "--baseline-steps", str(a.baseline_steps)],
        "equal": ["fit_epoch.py", *common, "--variants", "eager,graphs", "--limit-batches", str(a.equal_steps)],
        "fast": ["fit_epoch.py", *common, "--variants", "graphs", "--epochs", "2", "--no-capture-clock"],
        "predict": ["predict_rows.py", *common, "--variants", "config", "--repeat", "1"],
        "predict_x12": ["predict_rows.py", *common, "--variants", "config", "--repeat", "12"],
    }


def run_step(name: str, cmd: list[str], folder: Path) -> dict:
    """Runs one step in a fresh process with empty compile caches; its JSON results (or the error)."""
    out = folder / f"{name}.json"
    log = folder / f"{name}.log"
    with tempfile.TemporaryDirectory(prefix=f"finllm_inductor_{name}_") as cache, open(log, "w") as f:
        # empty caches of every compiler: inductor's, Triton's, and torch's NVRTC kernels (jiterator: kernels.py)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=f"{cache}/triton",
                   PYTORCH_KERNEL_CACHE_PATH=f"{cache}/kernels")
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:], "--out", str(out)], env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    print(f"{name}: rc {rc}, {wall:.0f} s (log {log})", flush=True)
    if rc != 0 or not out.exists():
        return {"error": f"rc {rc}; see {log}", "wall_s": wall}
    return {**json.loads(out.read_text()), "wall_s": wall}


def tables(res: dict) -> list[str]:
    """The training and labeling tables from the steps' results (a step that failed is left out, and said)."""
    lines = []
    base = next((r for r in res.get("baseline", {}).get("train", []) if r.get("name") == "baseline"), None)
    gen = next((r for r in res.get("baseline", {}).get("label", []) if r.get("name", "").startswith("generate")), None)
    fast = next(iter(res.get("fast", {}).get("runs", [])), None)
    equal = {r["variant"]: r for r in res.get("equal", {}).get("runs", [])}
    lines += ["| training, one epoch of 13,173 rows (effective batch 32) | s/epoch | later epoch | tokens/s (later) | "
              "supervised tokens/s (later) | peak GiB | x baseline (1st epoch) | x baseline (later) |",
              "|---|---|---|---|---|---|---|---|"]
    if base and "s_per_epoch" in base:
        lines.append(f"| peft recipe (micro 4 x 8, checkpointing; {base['timed_steps']} steps extrapolated) | "
                     f"{base['s_per_epoch']:,.0f} | - | {base['tok_s']:,.0f} | {base['sup_tok_s']:,.1f} | "
                     f"{base['peak_gib']:.2f} | 1.0 | 1.0 |")
    if fast:
        first, later = fast["epochs_s"][0], fast["epochs_s"][-1]
        sup = fast.get("supervised_per_epoch")
        ratio = (lambda s: f"{base['s_per_epoch'] / s:.0f}") if base and "s_per_epoch" in base else (lambda s: "-")
        lines.append(f"| fast config (micro 32, CUDA graphs, fused norms/MLPs, shared prefix; 2 real epochs) | "
                     f"{first:.1f} | {later:.1f} | {fast['tokens_per_epoch'] / later:,.0f} | "
                     f"{'-' if sup is None else format(sup / later, ',.0f')} | {fast['peak_gib']:.2f} | "
                     f"{ratio(first)} | {ratio(later)} |")
    if "eager" in equal and "graphs" in equal:
        e, g = equal["eager"]["losses"], equal["graphs"]["losses"]
        diff = max((abs(x - y) for x, y in zip(e, g)), default=float("nan"))
        lines += ["", f"Same losses: the fast step vs the project's eager step on the same first {len(e)} optimizer "
                      f"steps: max |loss difference| {diff:.4f} (bf16), loss at step {len(e)}: {e[-1]:.4f} eager, "
                      f"{g[-1]:.4f} fast."]
    lines += ["", "| labeling (whole predict job: read, tokenize, score, write) | rows | rows/s from the first batch | "
                  "wait for the first batch s | rows/s with the wait | peak GiB | x generate |",
              "|---|---|---|---|---|---|---|"]
    if gen and "rows_s" in gen:
        lines.append(f"| `generate` (batch 64, 8 new tokens; gpu_throughput.py, model calls only) | {gen['rows']:,} | "
                     f"{gen['rows_s']:,.0f} | - | - | {gen['peak_gib']:.2f} | 1.0 |")
    for key in ("predict", "predict_x12"):
        r = next(iter(res.get(key, {}).get("runs", [])), None)
        if r:
            wait = r.get("first_batch_s") or 0.0
            whole = r["rows"] / (r["seconds"] + wait)
            x = f"{whole / gen['rows_s']:.0f}" if gen and "rows_s" in gen else "-"
            lines.append(f"| label scoring, fast config{' (the set x12)' if key == 'predict_x12' else ''} | "
                         f"{r['rows']:,} | {r['rows_s']:,.0f} | {wait:.2f} | {whole:,.0f} | {r['peak_gib']:.2f} | {x} |")
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    if failed:
        lines += ["", f"Failed steps (see their logs): {', '.join(failed)}"]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json + chat template)")
    ap.add_argument("--data", required=True, help="instruction JSONL (the 13,173-row sentiment set)")
    ap.add_argument("--out", default="results/gpu/benchmark.json")
    ap.add_argument("--steps", default="baseline,equal,fast,predict,predict_x12", help="which steps, comma list")
    ap.add_argument("--baseline-steps", type=int, default=3, help="timed optimizer steps of the (slow) peft recipe")
    ap.add_argument("--equal-steps", type=int, default=40, help="micro-batches compared, eager vs fast")
    a = ap.parse_args(argv)
    out = Path(a.out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    todo = steps(a)
    res: dict = {"argv": sys.argv[1:]}
    for name in a.steps.split(","):
        res[name] = run_step(name, todo[name], folder)
        out.write_text(json.dumps(res, indent=1))
    lines = tables(res)
    out.write_text(json.dumps({**res, "table": lines}, indent=1))
    print("\n".join(lines))
    return 1 if any(isinstance(v, dict) and "error" in v for v in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
