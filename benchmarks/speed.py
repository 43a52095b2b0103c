"""Speed and equality of the fast backend on one GPU, for one architecture at its real size (random weights).

For --arch (the DeepSeek-R1-Distill-Qwen-1.5B, Llama-3.2-1B or Qwen3-1.7B shape; the hub is unreachable, so the
model is built from its config with random weights and --tokenizer's tokenizer), through the CLI:
  1. fit, fast backend: configs/deepseek_r1_distill_qwen_1.5b_fast.yaml on --data for --epochs epochs; each epoch
     timed (the first includes capturing the CUDA graphs; loading the model and the backend's self-check come
     before it, timed apart), peak memory, and which components the self-check kept (and why it dropped others);
  2. fit, plain backend, the same run stopped after --plain-steps optimizer steps: its per-step losses against the
     fast run's (LoRA dropout 0 in both, so the runs differ by bf16 rounding alone);
  3. predict, fast backend, with a random LoRA adapter of the trained shape: the whole job on --data (rows/s from
     the first batch and with the wait for it);
  4. predict, plain backend, on the first --plain-rows rows: label agreement and the largest probability
     difference against the fast run's labels of the same rows.
Prints a table and writes JSON.

    python benchmarks/speed.py --arch qwen2-1.5b --tokenizer DIR --data instruction_formatted_data.jsonl --out results/gpu/speed.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from finllm_pl.__main__ import cli_main  # noqa: E402
from finllm_pl.assets import QWEN_1_5B  # noqa: E402
from finllm_pl.predict import PredictionWriter  # noqa: E402

CONFIG = "configs/deepseek_r1_distill_qwen_1.5b_fast.yaml"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
ARCHS = {  # their config.json's shape (what speed depends on)
    "qwen2-1.5b": ("qwen2", dict(QWEN_1_5B)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                                   rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})),
    "tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048)),  # (a CPU dry run)
    "qwen3-1.7b": ("qwen3", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
                                 rms_norm_eps=1e-6)),
}


def build(arch: str, tokenizer: str, out: Path) -> Path:
    """A model folder of the architecture: random bf16 weights (made on the GPU) and the given tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, shape = ARCHS[arch]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = AutoConfig.for_model(kind, **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def adapter(model_dir: Path, out: Path, targets: list[str]) -> Path:
    """A LoRA adapter of the trained shape with random A and B (folding it in changes the scores)."""
    from finllm_pl import model as hf

    base = hf.load_base_model(str(model_dir), "none", torch.bfloat16, torch.device(DEVICE))
    peft_model = hf.add_lora(base, 4, 8, 0.05, targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out))
    del peft_model, base
    torch.cuda.empty_cache()
    return out


class Clock(Callback):
    """Each training epoch's wall time, the per-step losses (read at the end: no sync per step), and an optional
    stop after `stop_after` optimizer steps (the run keeps its schedule, sized for the whole run)."""

    def __init__(self, stop_after: int = 0):
        self.stop_after, self.seconds, self.losses, self.t0 = stop_after, [], {}, None
        self.created, self.before_training_s = time.perf_counter(), None

    def on_train_epoch_start(self, trainer, pl_module):
        sync()
        self.t0 = time.perf_counter()
        if self.before_training_s is None:  # (loading the model, the self-check, tokenizing or reading the cache)
            self.before_training_s = self.t0 - self.created

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and "train/loss" in trainer.callback_metrics:
            self.losses.setdefault(step, trainer.callback_metrics["train/loss"])
        if self.stop_after and step >= self.stop_after and not pl_module.window_open:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module):
        sync()
        self.seconds.append(time.perf_counter() - self.t0)


def fit(model_dir: Path, data: str, tmp: Path, name: str, epochs: int, extra: list[str], stop_after: int = 0):
    reset_peak()
    clock = Clock(stop_after)
    cli = cli_main(["--config", CONFIG, "--model.model_name_or_path", str(model_dir), "--data.train_path", data,
                    "--data.val_fraction", "0", "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0",
                    "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
                    "--checkpoint.dirpath", str(tmp / name), "--checkpoint.every_n_train_steps", "100000", *extra],
                   run=False)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    dm, backend = cli.datamodule, cli.model.backend
    run = {"epochs_s": [round(s, 2) for s in clock.seconds], "steps": cli.trainer.global_step,
           "before_training_s": round(clock.before_training_s, 2),
           "tokens_per_epoch": sum(dm.train_set["length"]), "peak_gib": peak_gib(),
           "backend": backend.describe(), "kept": [c for c, on in backend.enabled.items() if on],
           "dropped": getattr(cli.model, "decision", None) and cli.model.decision.off,
           "losses": [round(float(clock.losses[k]), 5) for k in sorted(clock.losses)]}
    del cli
    gc.collect()
    reset_peak()
    return run


def predict(model_dir: Path, adapter_dir: Path, data: str, out: Path, extra: list[str]) -> dict:
    reset_peak()
    t0 = time.perf_counter()
    cli = cli_main(["predict", "--config", CONFIG, "--model.model_name_or_path", str(model_dir), "--ckpt_path",
                    str(adapter_dir), "--data.predict_path", data, "--data.predict_output", str(out),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra])
    job = time.perf_counter() - t0
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
    s = writer.speed
    run = {"rows": s["rows"], "rows_s_from_first_batch": round(s["rows_s"], 1),
           "first_batch_s": round(s["first_batch_s"] or 0.0, 3),
           "rows_s_with_wait": round(s["rows"] / (s["seconds"] + (s["first_batch_s"] or 0.0)), 1),
           "job_s": round(job, 2), "peak_gib": peak_gib(), "backend": cli.model.backend.describe()}
    del cli
    gc.collect()
    reset_peak()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2-1.5b", choices=sorted(ARCHS))
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json + chat template)")
    ap.add_argument("--data", required=True, help="instruction JSONL (the 13,173-row sentiment set)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--plain-steps", type=int, default=40, help="optimizer steps of the plain run (losses compared)")
    ap.add_argument("--plain-rows", type=int, default=2048, help="rows the plain backend labels (compared)")
    ap.add_argument("--steps", default="fit,plain_fit,predict,plain_predict", help="which steps, comma list")
    ap.add_argument("--out", default="results/gpu/speed.json")
    a = ap.parse_args(argv)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    res = {"arch": a.arch, "device": device, "torch": torch.__version__, "argv": sys.argv[1:]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = a.steps.split(",")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    equal = ["--model.lora_dropout", "0"]  # the fast and plain runs then differ by rounding alone
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finllm_speed_") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build(a.arch, a.tokenizer, tmp / a.arch)
        res["build_s"] = round(time.perf_counter() - t_start, 1)
        if "fit" in todo:
            res["fit"] = fit(model_dir, a.data, tmp, "fast", a.epochs, equal)
            out.write_text(json.dumps(res, indent=1))
        if "plain_fit" in todo:
            res["plain_fit"] = fit(model_dir, a.data, tmp, "plain", a.epochs, [*equal, "--model.backend", "plain"],
                                   stop_after=a.plain_steps)
            if "fit" in res:
                pairs = list(zip(res["fit"]["losses"], res["plain_fit"]["losses"]))[:a.plain_steps]
                res["loss_max_abs_diff"] = max(abs(x - y) for x, y in pairs)
                res["loss_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in pairs)
            out.write_text(json.dumps(res, indent=1))
        if "predict" in todo or "plain_predict" in todo:
            lora = adapter(model_dir, tmp / "adapter", targets)
            fast_out = tmp / "fast.jsonl"
            if "predict" in todo:
                res["predict"] = predict(model_dir, lora, a.data, fast_out, [])
                out.write_text(json.dumps(res, indent=1))
            if "plain_predict" in todo and fast_out.exists():
                subset = tmp / "subset.jsonl"
                with open(a.data) as f, open(subset, "w") as g:
                    g.writelines(line for _, line in zip(range(a.plain_rows), f))
                plain_out = tmp / "plain.jsonl"
                res["plain_predict"] = predict(model_dir, lora, str(subset), plain_out, ["--model.backend", "plain"])
                fast_rows = [json.loads(line) for _, line in zip(range(a.plain_rows), open(fast_out))]
                plain_rows = [json.loads(line) for line in open(plain_out)]
                res["label_agreement"] = sum(x["label"] == y["label"] for x, y in zip(fast_rows, plain_rows)) / len(plain_rows)
                res["max_prob_diff"] = max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(fast_rows, plain_rows)
                                           for k in x["probs"])
                out.write_text(json.dumps(res, indent=1))
    lines = [f"{a.arch} on {res['device']}:"]
    if "fit" in res:
        f = res["fit"]
        later = f["epochs_s"][-1]
        lines.append(f"  fit (fast): epochs {f['epochs_s']} s, {f['steps']} steps, {f['tokens_per_epoch'] / later:,.0f} "
                     f"tokens/s (last epoch), peak {f['peak_gib']} GiB; kept: {', '.join(f['kept'])}")
    if "loss_max_abs_diff" in res:
        lines.append(f"  losses vs plain over {min(a.plain_steps, len(res['plain_fit']['losses']))} steps: max |diff| "
                     f"{res['loss_max_abs_diff']:.4f} ({res['loss_max_rel_diff']:.2%} relative)")
    if "predict" in res:
        p = res["predict"]
        lines.append(f"  predict (fast): {p['rows']:,} rows, {p['rows_s_from_first_batch']:,.0f} rows/s from the first "
                     f"batch, {p['rows_s_with_wait']:,.0f} with the wait ({p['first_batch_s']} s)")
    if "label_agreement" in res:
        lines.append(f"  labels vs plain on {res['plain_predict']['rows']:,} rows: agreement {res['label_agreement']:.4f}, "
                     f"max |prob diff| {res['max_prob_diff']:.4f}; plain {res['plain_predict']['rows_s_with_wait']:,.0f} rows/s")
    res["table"] = lines
    out.write_text(json.dumps(res, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
