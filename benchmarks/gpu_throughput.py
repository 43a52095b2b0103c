"""Speed and memory of QLoRA training and labeling on one GPU: the plain peft recipe against the project's levers.

Model: the DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights (speed does not depend on the values),
saved to a temp folder and loaded back through the project's own path (`load_base_model` NF4 + `add_lora`).
Tokens: a real tokenizer from `--tokenizer` (SmolLM2's 49k BPE: every id is valid for the 151,936 vocabulary) and
the real data through `PromptFormatter` + `tokenize_file`, so lengths and padding are those of a real run.

Training variants each time N optimizer steps after a warm-up, on the same seeded subset of rows, and extrapolate
to one epoch (13,173 rows) at their effective batch. Labeling compares `score_labels` with `generate`.
Prints Markdown tables last and writes JSON (after every variant, atomically, so a killed run keeps its results).

    python benchmarks/gpu_throughput.py --tokenizer DIR --data FILE --out results/gpu_throughput.json
    python benchmarks/gpu_throughput.py --tokenizer models/smollm2-135m-instruct --data FILE --tiny --steps 2
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine reaches no network; never wait on the hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` from the repo root
# transformers 5.2x renamed gradient_checkpointing_* (peft and the project still call the old names): log noise only
warnings.filterwarnings("ignore", message=r".*checkpointing.* is deprecated", category=FutureWarning)

import torch  # noqa: E402

from finllm_pl.data import LengthGroupedBatchSampler, collate_prompts, collate_train, default_cache_dir, tokenize_file  # noqa: E402
from finllm_pl.model import add_lora, load_base_model, split_head  # noqa: E402
from finllm_pl.prompts import DEFAULT_INSTRUCTION, DEFAULT_LABELS, PromptFormatter  # noqa: E402
from finllm_pl.scoring import loss_sum, score_labels  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def log(*a):
    print(*a, flush=True)


@dataclass
class Variant:
    name: str
    micro: int
    accum: int
    ckpt: bool  # gradient checkpointing
    loss_fn: str  # "hf_mean" (tutorial), "hf_sum" (full-vocab logits, project scaling), "sparse" (loss_sum)
    grouped: bool  # LengthGroupedBatchSampler grouping; False = random batches
    compile: bool = False
    note: str = ""


def variants(eff: int) -> list[Variant]:
    """eff = effective batch (32 on GPU, 4 in --tiny). Each project variant changes one lever from `project`."""
    bm = max(1, eff // 8)
    return [
        Variant("baseline", bm, eff // bm, True, "hf_mean", False, note="peft tutorial recipe"),
        Variant("project", eff, 1, False, "sparse", True, note="loss_sum + length groups, no ckpt"),
        Variant("project_ckpt", eff, 1, True, "sparse", True, note="+ gradient checkpointing"),
        Variant("project_fullvocab", eff, 1, False, "hf_sum", True, note="full-vocabulary logits instead of loss_sum"),
        Variant("project_random", eff, 1, False, "sparse", False, note="random batches instead of length groups"),
        Variant(f"project_m{2 * eff}", 2 * eff, 1, False, "sparse", True, note=f"effective batch {2 * eff}, not {eff}"),
        Variant("project_compile", eff, 1, False, "sparse", True, compile=True, note="torch.compile per decoder layer"),
    ]


@contextmanager
def hard_limit(seconds: float):
    """SIGALRM cap: a variant that hangs (a compile that never ends) is recorded as failed, the rest still run."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"over its time limit of {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(int(math.ceil(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------
def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, folder: str):
    """Random-weight Qwen2 (DeepSeek-R1-Distill-Qwen-1.5B shape) saved in `dtype`, then loaded the project's way."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4) if tiny else \
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
    cfg = Qwen2Config(vocab_size=151_936, num_key_value_heads=2, max_position_embeddings=131_072, rope_theta=10000.0,
                      tie_word_embeddings=False, use_sliding_window=False, rms_norm_eps=1e-6,
                      bos_token_id=151_646, eos_token_id=151_643, **size)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with device:  # init straight on the GPU in the target dtype: seconds instead of a minute of CPU init
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t1 = time.perf_counter()
    base = load_base_model(folder, "nf4", dtype, device if device.type == "cuda" else torch.device("cpu"))
    base.config.use_cache = False  # training forwards must not build a KV cache (the project does the same)
    # Built once without checkpointing; variants toggle it (rebuilding per variant would cost ~15 s each on GPU).
    model = add_lora(base, r=4, alpha=8, dropout=0.05, target_modules=TARGETS, gradient_checkpointing=False)
    t2 = time.perf_counter()
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: build+save {t1 - t0:.1f}s, nf4 load + LoRA {t2 - t1:.1f}s, {n_train:,} trainable / {n_all:,} "
        f"stored params")
    return model, {"build_save_s": t1 - t0, "load_s": t2 - t1, "trainable_params": n_train, "config": cfg.to_dict()}


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def layers_of(model):
    return split_head(model)[0].layers


def load_data(args, tokenizer):
    formatter = PromptFormatter(tokenizer, style="auto")
    if formatter.style != "chat":
        log("WARNING: tokenizer has no chat template (carry chat_template.jinja too?); using the plain prompt format")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    t0 = time.perf_counter()
    ds = tokenize_file(args.data, formatter, args.max_length, DEFAULT_INSTRUCTION, DEFAULT_LABELS, cache)
    rows = ds.with_format(None).to_list()
    n = len(rows)
    sup = [sum(1 for t in r["labels"][1:] if t != -100) for r in rows]  # loss positions (answer + EOS)
    stats = {"rows": n, "tokenize_s": time.perf_counter() - t0, "prompt_style": formatter.style,
             "think": formatter.think, "mean_tokens_per_row": sum(r["length"] for r in rows) / n,
             "max_tokens_per_row": max(r["length"] for r in rows), "mean_supervised_tokens_per_row": sum(sup) / n,
             "truncated_rows": sum(bool(r["truncated"]) for r in rows), "max_length": args.max_length}
    log(f"data: {n} rows, {stats['mean_tokens_per_row']:.1f} tokens/row (max {stats['max_tokens_per_row']}), "
        f"{stats['mean_supervised_tokens_per_row']:.2f} supervised/row, style={formatter.style}")
    return formatter, rows, stats


def seeded_subset(n_total: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(n, n_total)].tolist()


def epoch_padded_tokens(lengths: list[int], micro: int, grouped: bool, seed: int) -> int:
    """Padded tokens one full epoch would feed with this batching (used for a second, token-based extrapolation)."""
    sampler = LengthGroupedBatchSampler(lengths, micro, seed=seed, group_by_length=grouped)
    return sum(len(b) * max(lengths[i] for i in b) for b in sampler)


# ---------------------------------------------------------------------------------------------------------
# Training variants
# ---------------------------------------------------------------------------------------------------------
def run_train(v: Variant, model, rows, subset, args, device, dtype, init_state) -> dict:
    cuda = device.type == "cuda"
    steps = min(args.steps, args.baseline_steps) if v.name == "baseline" else args.steps
    warmup = args.compile_warmup if v.compile else (1 if v.name == "baseline" else args.warmup)
    with torch.no_grad():  # every variant starts from the same adapter, so their losses are comparable
        for n, p in model.named_parameters():
            if n in init_state:
                p.copy_(init_state[n])
    model.train()  # from_pretrained returns eval mode: LoRA dropout would be off
    set_checkpointing(model, v.ckpt)
    if v.compile:
        import torch._dynamo as dynamo

        for key in ("recompile_limit", "cache_size_limit"):  # 28 layers + dynamic shapes outgrow the default 8
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, 64)
        for layer in layers_of(model):
            layer.compile(dynamic=True)  # one graph serves all layers; dynamic: lengths vary per batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    torch.manual_seed(args.seed)

    sub_lengths = [rows[i]["length"] for i in subset]
    sampler = LengthGroupedBatchSampler(sub_lengths, v.micro, seed=args.seed, group_by_length=v.grouped)
    batches = [collate_train([rows[subset[j]] for j in b], args.pad_id) for b in sampler]
    need = (warmup + steps) * v.accum
    batches = (batches * math.ceil(need / len(batches)))[:need]  # cycle only if the subset is too small
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else nullcontext()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t_start, step_times, losses = time.perf_counter(), [], []
    counts = {"sup": 0, "tok": 0, "pad": 0}
    it = iter(batches)
    for step in range(warmup + steps):
        timed = step >= warmup
        sync()
        t0 = time.perf_counter()
        win_loss, win_tokens = [], 0
        for _ in range(v.accum):
            b = next(it)
            n_sup = int((b["labels"][:, 1:] != -100).sum())  # counted on the CPU copy: no GPU sync per micro
            ids, mask, labels = (b[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
            with autocast:
                if v.loss_fn == "sparse":  # the project: LM head only on supervised positions, summed loss
                    loss, _ = loss_sum(model, ids, mask, labels)
                else:  # full-vocabulary logits through HF's own loss (mean over the micro-batch's tokens)
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            if v.loss_fn == "hf_mean":  # tutorial: mean loss per micro-batch, divided by the accumulation
                (loss / v.accum).backward()
                win_loss.append(loss.detach())
            else:  # project: summed loss now, gradients divided by the window's token count at the step
                total = loss if v.loss_fn == "sparse" else loss * n_sup
                total.backward()
                win_loss.append(total.detach())
            win_tokens += n_sup
            if timed:
                counts["sup"] += n_sup
                counts["tok"] += int(b["attention_mask"].sum())
                counts["pad"] += b["input_ids"].numel()
        if v.loss_fn != "hf_mean":
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / max(win_tokens, 1))
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # both recipes clip at 1.0 (HF Trainer's and the project's default)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        step_loss = float(torch.stack(win_loss).sum()) / (v.accum if v.loss_fn == "hf_mean" else max(win_tokens, 1))
        log(f"  {v.name} step {step + 1}/{warmup + steps}{'' if timed else ' (warm-up)'}: {dt:.3f}s loss {step_loss:.4f}")
        if timed:
            step_times.append(dt)
            losses.append(step_loss)
            if time.perf_counter() - t_start > args.variant_budget and len(step_times) >= 1:
                log(f"  {v.name}: stopping after {len(step_times)} timed steps (--variant-budget {args.variant_budget}s)")
                break
    t = sum(step_times)
    eff = v.micro * v.accum
    res = {**asdict(v), "effective_batch": eff, "warmup_steps": warmup, "timed_steps": len(step_times),
           "step_s": t / len(step_times), "s_per_epoch": t / len(step_times) * math.ceil(args.epoch_rows / eff),
           "sup_tok_s": counts["sup"] / t, "tok_s": counts["tok"] / t, "padded_tok_s": counts["pad"] / t,
           "pad_fraction": 1 - counts["tok"] / counts["pad"], "loss": sum(losses) / len(losses),
           "wall_s": time.perf_counter() - t_start}
    # Second estimate, from padded tokens: exact epoch padding for this batching, at the measured padded tok/s.
    res["s_per_epoch_by_tokens"] = epoch_padded_tokens(args.all_lengths, v.micro, v.grouped, args.seed) / res["padded_tok_s"]
    return res


def cleanup_train(model, v: Variant, device) -> None:
    if v.compile:
        for layer in layers_of(model):
            layer._compiled_call_impl = None  # undo Module.compile so later variants and labeling run eager
        import torch._dynamo as dynamo

        dynamo.reset()
    for p in model.parameters():
        p.grad = None
    set_checkpointing(model, False)
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Labeling
# ---------------------------------------------------------------------------------------------------------
def run_label(name: str, model, prompts, label_ids, batch: int, args, device, dtype) -> dict:
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else nullcontext()
    gen = name.startswith("generate")
    if not gen:  # score_labels: sorted by length, so a batch pads to nearly its own length
        prompts = sorted(prompts, key=len)
    batches = [collate_prompts(prompts[s:s + batch], args.pad_id, label_ids) for s in range(0, len(prompts), batch)]
    model.eval()

    def one(b, new_tokens=args.gen_tokens):
        ids, mask = b["prompt_ids"].to(device), b["prompt_mask"].to(device)
        if gen:  # the tutorial's way: greedy decoding of a few tokens, answer parsed from the text afterwards
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=args.pad_id, eos_token_id=args.eos_id)
            return out.shape[1] - ids.shape[1]
        score_labels(model, ids, mask, b["label_ids"].to(device), b["label_mask"].to(device))
        return 0

    with torch.no_grad(), autocast:
        one(max(batches, key=lambda b: b["prompt_ids"].numel()), 2)  # warm-up on the largest batch (allocator)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        new = [one(b) for b in batches]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
    res = {"name": name, "batch": batch, "rows": len(prompts), "seconds": t, "rows_s": len(prompts) / t,
           "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
           "padded_prompt_tokens": sum(b["prompt_ids"].numel() for b in batches)}
    if gen:
        res["mean_new_tokens"] = sum(new) / len(new)
    log(f"  {name}: {len(prompts)} rows in {t:.2f}s = {res['rows_s']:.1f} rows/s")
    return res


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def tables(results: dict) -> str:
    out = ["| variant | micro | accum | grad ckpt | s/epoch | sup tok/s | tok/s | padded tok/s | peak GiB | loss | x baseline |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
        if "error" in r:
            out.append(f"| {r['name']} | {r['micro']} | {r['accum']} | {'on' if r['ckpt'] else 'off'} | "
                       f"failed: {r['error'][:100].replace('|', '/')} |||||||")
            continue
        out.append(f"| {r['name']} | {r['micro']} | {r['accum']} | {'on' if r['ckpt'] else 'off'} | "
                   f"{r['s_per_epoch']:,.0f} | {r['sup_tok_s']:,.0f} | {r['tok_s']:,.0f} | {r['padded_tok_s']:,.0f} | "
                   f"{fmt(r.get('peak_gib'), '.2f')} | {r['loss']:.3f} | {fmt(r.get('x_baseline'), '.2f')} |")
    out.append(f"\ns/epoch: time per optimizer step x ceil({results['config']['epoch_rows']} / (micro x accum)); "
               "x baseline = baseline s/epoch / this s/epoch (higher is faster). Loss: random weights, ~ln(vocab).")
    out += ["", "| labeling | batch | rows | rows/s | peak GiB | x generate |", "|---|---|---|---|---|---|"]
    for r in results["label"]:
        if "error" in r:
            out.append(f"| {r['name']} | {r.get('batch', '-')} | failed: {r['error'][:100].replace('|', '/')} ||||")
            continue
        out.append(f"| {r['name']} | {r['batch']} | {r['rows']} | {r['rows_s']:,.1f} | {fmt(r.get('peak_gib'), '.2f')} | "
                   f"{fmt(r.get('x_generate'), '.1f')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, tokenizer_config.json (+ chat template)")
    ap.add_argument("--data", required=True, help="instruction JSONL (instruction/input/output rows)")
    ap.add_argument("--out", default="results/gpu_throughput.json")
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model, float32, CPU, small batches")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant (default 20; tiny 2)")
    ap.add_argument("--baseline-steps", type=int, default=3, help="timed steps of the (slow) baseline")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 2; tiny and baseline 1)")
    ap.add_argument("--compile-warmup", type=int, default=3, help="untimed steps of the compile variant")
    ap.add_argument("--variants", default=None,
                    help="comma list of names or globs, e.g. 'baseline,project*,score_*' (default: all; --tiny: all "
                         "but project_compile, which takes ~80 s to compile on a CPU)")
    ap.add_argument("--label-rows", type=int, default=None, help="rows scored by score_labels (default 2048; tiny 64)")
    ap.add_argument("--gen-rows", type=int, default=None, help="rows labeled by generate (default 256; tiny 16)")
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--variant-budget", type=float, default=45.0, help="stop timing a variant after this many seconds")
    ap.add_argument("--variant-timeout", type=float, default=120.0, help="hard cap per variant (SIGALRM), 0 = none")
    ap.add_argument("--compile-timeout", type=float, default=90.0, help="hard cap of project_compile, compiling included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="tokenization cache (default: the project's)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (2 if tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.label_rows = args.label_rows or (64 if tiny else 2048)
    args.gen_rows = args.gen_rows or (16 if tiny else 256)
    eff = 4 if tiny else 32
    label_batches = (8, 16, 32) if tiny else (64, 128, 256)
    gen_batch = 8 if tiny else 64
    pats = [p.strip() for p in (args.variants or "*").split(",") if p.strip()]
    skip = {"project_compile"} if tiny and args.variants is None else set()
    wanted = lambda name: name not in skip and any(fnmatch.fnmatch(name, p) for p in pats)  # noqa: E731

    if not tiny and not torch.cuda.is_available():
        log("no CUDA device: run with --tiny on CPU")
        return 2
    device = torch.device("cpu") if tiny else torch.device("cuda:0")
    dtype = torch.float32 if tiny else torch.bfloat16
    t_all = time.perf_counter()

    from transformers import AutoTokenizer
    import bitsandbytes, peft, transformers

    # Not finllm_pl.model.load_tokenizer: it insists on a config.json, which a tokenizer-only folder lacks.
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    args.pad_id, args.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    formatter, rows, data_stats = load_data(args, tokenizer)
    args.all_lengths = [r["length"] for r in rows]
    args.epoch_rows = len(rows)

    train_vs = [v for v in variants(eff) if wanted(v.name)]
    need = max([(max(args.warmup, args.compile_warmup) + args.steps) * v.micro * v.accum for v in train_vs] or [0])
    subset = seeded_subset(len(rows), math.ceil(need / 64) * 64, args.seed)
    results = {
        "env": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "bitsandbytes": bitsandbytes.__version__, "tokenizer": os.path.abspath(args.tokenizer),
                "tokenizer_vocab": len(tokenizer), "compute_dtype": str(dtype)},
        "config": {"tiny": tiny, "effective_batch": eff, "steps": args.steps, "baseline_steps": args.baseline_steps,
                   "warmup": args.warmup, "train_subset_rows": len(subset), "epoch_rows": args.epoch_rows,
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "targets": TARGETS}, "lr": 1e-4, "seed": args.seed},
        "data": data_stats, "train": [], "label": [],
    }
    out = Path(args.out)

    try:
        with tempfile.TemporaryDirectory(prefix="finllm_bench_") as folder:
            model, info = build_model(tiny, device, dtype, folder)
    except Exception as e:  # nothing can be measured without the model: say why in the results file too
        results["error"] = f"model build/load failed: {type(e).__name__}: {e}"[:1000]
        write_json(out, results)
        raise
    results["model"] = {k: v for k, v in info.items() if k != "config"}
    init_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def guarded(job: dict, fn, timeout: float) -> dict:
        """Run one measurement; an OOM, a compile failure or a timeout is recorded and the next one still runs."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            with hard_limit(timeout):
                res = fn()
        except Exception as e:
            res = {**job, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]}
            log(f"  {job['name']} FAILED: {res['error']}")
        if device.type == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return res

    for v in train_vs:
        log(f"== {v.name}: micro {v.micro} x accum {v.accum}, ckpt {v.ckpt}, loss {v.loss_fn}, grouped {v.grouped}")
        res = guarded(asdict(v), lambda: run_train(v, model, rows, subset, args, device, dtype, init_state),
                      args.compile_timeout if v.compile else args.variant_timeout)
        cleanup_train(model, v, device)
        if "error" not in res:
            log(f"  {v.name}: {res['step_s']:.3f}s/step, {res['s_per_epoch']:,.0f} s/epoch, {res['tok_s']:,.0f} tok/s, "
                f"peak {fmt(res.get('peak_gib'), '.2f')} GiB")
        results["train"].append(res)
        write_json(out, results)

    label_ids = formatter.encode_labels(list(DEFAULT_LABELS))
    pick = seeded_subset(len(rows), args.label_rows, args.seed + 1)
    prompts = [rows[i]["input_ids"][: rows[i]["prompt_len"]] for i in pick]  # == formatter.encode_prompt(...)
    label_jobs = [(f"score_b{b}", b, prompts) for b in label_batches] + \
        [(f"generate_b{gen_batch}", gen_batch, prompts[: args.gen_rows])]
    for name, batch, ps in label_jobs:
        if wanted(name):
            log(f"== {name}")
            results["label"].append(guarded({"name": name, "batch": batch},
                                            lambda: run_label(name, model, ps, label_ids, batch, args, device, dtype),
                                            args.variant_timeout))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(out, results)

    base = next((r for r in results["train"] if r["name"] == "baseline" and "error" not in r), None)
    for r in results["train"]:
        if base and "error" not in r:
            r["x_baseline"] = base["s_per_epoch"] / r["s_per_epoch"]  # speed-up: >1 is faster than the baseline
    gen = next((r for r in results["label"] if r["name"].startswith("generate") and "error" not in r), None)
    for r in results["label"]:
        if gen and "error" not in r:
            r["x_generate"] = r["rows_s"] / gen["rows_s"]
    results["wall_s"] = time.perf_counter() - t_all
    write_json(out, results)
    log(f"\nwrote {out} ({results['wall_s']:.0f}s in all); {results['env']['device']}, data "
        f"{data_stats['mean_tokens_per_row']:.1f} tokens/row, {data_stats['mean_supervised_tokens_per_row']:.2f} "
        f"supervised/row, prompt style {data_stats['prompt_style']}\n")
    log(tables(results))
    # Exit 1 when a measurement failed; the optional compile variant failing is a result, not a failure.
    return 1 if any("error" in r and not r.get("compile") for r in results["train"] + results["label"]) else 0


if __name__ == "__main__":
    sys.exit(main())
