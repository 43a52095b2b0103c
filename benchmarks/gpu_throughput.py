"""Speed and memory of QLoRA training and labeling on one GPU: the plain peft recipe against the project's levers.

Model: the DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights (speed does not depend on the values),
saved to a temp folder and loaded back through the project's own path (`load_base_model` NF4 + `add_lora`).
Tokens: a real tokenizer from `--tokenizer` (SmolLM2's 49k BPE: every id is valid for the 151,936 vocabulary) and
the real data through `PromptFormatter` + `tokenize_file`, so lengths and padding are those of a real run.

One untimed forward/backward at the largest micro-batch warms the GPU up first (CUDA context, cuBLAS, allocator),
so the first timed variant is not penalised; `project` also runs again at the end (`project_again`) to show
whether the order of the variants matters. Training variants each time N optimizer steps after a warm-up, on the
same seeded subset of rows, and extrapolate to one epoch (13,173 rows) at their effective batch. Labeling compares
`score_labels` (with and without shared-prefix reuse, same rows, label agreement reported) with `generate`.
`--profile NAMES` runs torch.profiler over 2 steps (or 2 batches) of those variants after their timing and
records the top CUDA kernels, the GPU busy fraction and the top CPU ops. `--total-budget` skips what would not
fit the time left. Prints Markdown tables last and writes JSON (after every variant, atomically, so a killed run
keeps its results).

    python benchmarks/gpu_throughput.py --tokenizer DIR --data FILE --out results/gpu_throughput.json \
        --profile project,score_b512_prefix --total-budget 420
    python benchmarks/gpu_throughput.py --tokenizer models/smollm2-135m-instruct --data FILE --tiny --steps 2 \
        --profile project,score_b32_prefix
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import re
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
sys.path.insert(1, str(Path(__file__).resolve().parent))
# transformers 5.2x renamed gradient_checkpointing_* (peft and the project still call the old names): log noise only
warnings.filterwarnings("ignore", message=r".*checkpointing.* is deprecated", category=FutureWarning)

import torch  # noqa: E402

from finllm_pl.assets import QWEN_1_5B  # noqa: E402
from finllm_pl.data import LengthGroupedBatchSampler, budget_batches, collate_prompts, collate_train, default_cache_dir, tokenize_file  # noqa: E402
from finllm_pl.model import add_lora, load_base_model, split_head  # noqa: E402
from finllm_pl.prompts import DEFAULT_INSTRUCTION, DEFAULT_LABELS, PromptFormatter  # noqa: E402
from finllm_pl.scoring import _decoder_call, common_prefix_length, loss_sum, score_labels  # noqa: E402

from cache_scoring import score_labels_cache  # noqa: E402  (benchmarks/: the previous method, a baseline)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIN_PREFIX = 8  # score_labels' default threshold for shared-prefix reuse


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
    dropout: bool = True  # LoRA dropout 0.05 (the recipe); False = LoRA dropout modules replaced by Identity
    precision: str = "autocast"  # "autocast": bf16 autocast, fp32 LoRA weights; "bf16": LoRA weights bf16, no autocast
    cudnn: bool = True  # SDPA may pick cuDNN attention (which plans per new shape); False: flash/efficient only
    pad_multiple: int = 1  # right-pad each micro-batch to a multiple of this (fewer distinct shapes)
    graphs: bool = False  # the whole step (forward, backward, clip, AdamW) as one CUDA graph per padded length
    note: str = ""


def variants(eff: int) -> list[Variant]:
    """eff = effective batch (32 on GPU, 4 in --tiny). Each project variant changes one lever from `project`.

    Order matters (the first timed variants ran slower in an earlier run): `project` is not first, and runs again
    as `project_again` after the others. `project_compile` runs last of all (after labeling): it is the slowest.
    """
    bm = max(1, eff // 8)
    m2, m4 = 2 * eff, 4 * eff
    return [
        Variant("baseline", bm, eff // bm, True, "hf_mean", False, note="peft tutorial recipe"),
        Variant("project_fullvocab", eff, 1, False, "hf_sum", True, note="full-vocabulary logits instead of loss_sum"),
        Variant(f"project_m{m2}", m2, 1, False, "sparse", True, note=f"effective batch {m2}, not {eff}"),
        Variant("project", eff, 1, False, "sparse", True, note="loss_sum + length groups, no ckpt"),
        Variant("project_ckpt", eff, 1, True, "sparse", True, note="+ gradient checkpointing"),
        Variant("project_random", eff, 1, False, "sparse", False, note="random batches instead of length groups"),
        Variant(f"project_m{m4}", m4, 1, False, "sparse", True, note=f"effective batch {m4}, not {eff}"),
        Variant(f"project_m{m4}_ckpt", m4, 1, True, "sparse", True, note=f"effective batch {m4} + gradient ckpt"),
        Variant("project_nodrop", eff, 1, False, "sparse", True, dropout=False,
                note="LoRA dropout 0 (changes the recipe: 0.05)"),
        Variant("project_bf16", eff, 1, False, "sparse", True, precision="bf16",
                note="LoRA weights + AdamW in bf16, no autocast (changes the recipe)"),
        Variant(f"project_m{m2}_nodrop_bf16", m2, 1, False, "sparse", True, dropout=False, precision="bf16",
                note=f"levers combined: batch {m2}, dropout 0, bf16 (changes the recipe)"),
        Variant("project_nocudnn", eff, 1, False, "sparse", True, cudnn=False, note="cuDNN attention off"),
        Variant("project_pad32", eff, 1, False, "sparse", True, pad_multiple=32,
                note="micro-batches padded to a multiple of 32 tokens"),
        Variant("project_graphs", eff, 1, False, "sparse", True, cudnn=False, pad_multiple=32, graphs=True,
                note="one CUDA graph per 32-token length bucket (benchmark only, not in the trainer yet)"),
        Variant(f"project_m{m2}_graphs", m2, 1, False, "sparse", True, cudnn=False, pad_multiple=32, graphs=True,
                note=f"effective batch {m2}, CUDA graphs"),
        Variant("project_again", eff, 1, False, "sparse", True, note="`project` again, late: order effects"),
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
    signal.alarm(max(1, int(math.ceil(seconds))))
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


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def maybe_profile(on: bool, device, out: dict):
    """torch.profiler around the block when `on`; the summary lands in out["profile"] (an error, not a crash)."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, record_shapes=False, with_stack=False)
    prof.start()
    sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        wall = time.perf_counter() - t0
        prof.stop()
        try:
            out["profile"] = summarize_profile(prof, wall)
        except Exception as e:  # a profiler API difference must not cost the run its other numbers
            out["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}


def kernel_table(kernels, wall_s: float, top: int = 25) -> dict:
    """kernels: (name, start_us, end_us) of every GPU activity. Top `top` by total time, and the busy fraction
    (union of the intervals over the wall time: low = the GPU waits on the CPU, i.e. launch/Python bound)."""
    agg: dict[str, list] = {}
    spans = []
    for name, start, end in kernels:
        a = agg.setdefault(name, [0, 0.0])
        a[0] += 1
        a[1] += end - start
        spans.append((start, end))
    total = sum(a[1] for a in agg.values())
    busy, cur_s, cur_e = 0.0, None, None
    for st, en in sorted(spans):
        if cur_e is None or st > cur_e:
            busy += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = st, en
        else:
            cur_e = max(cur_e, en)
    busy += 0.0 if cur_e is None else cur_e - cur_s
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    return {"wall_ms": wall_s * 1e3, "gpu_kernel_ms": total / 1e3, "gpu_busy_ms": busy / 1e3,
            "gpu_busy_fraction": busy / 1e3 / (wall_s * 1e3) if wall_s > 0 else None,
            "gpu_activities": sum(a[0] for a in agg.values()),
            "top_kernels": [{"name": n[:160], "calls": a[0], "total_ms": a[1] / 1e3,
                             "pct": 100 * a[1] / total if total else 0.0} for n, a in rows]}


def summarize_profile(prof, wall_s: float) -> dict:
    from torch.autograd import DeviceType

    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    res = kernel_table(kernels, wall_s)
    cpu = [a for a in prof.key_averages() if a.device_type == DeviceType.CPU]
    cpu_total = sum(a.self_cpu_time_total for a in cpu)
    res["cpu_self_ms"] = cpu_total / 1e3
    res["top_cpu_ops"] = [{"name": a.key[:160], "calls": a.count, "self_ms": a.self_cpu_time_total / 1e3,
                           "pct": 100 * a.self_cpu_time_total / cpu_total if cpu_total else 0.0}
                          for a in sorted(cpu, key=lambda a: -a.self_cpu_time_total)[:15]]
    return res


def profile_text(name: str, p: dict) -> str:
    if "error" in p:
        return f"profile {name}: failed: {p['error']}"
    out = [f"profile {name}: wall {p['wall_ms']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms "
           f"({fmt(p['gpu_busy_fraction'], '.0%')}), {p['gpu_activities']} GPU activities, CPU self {p['cpu_self_ms']:.1f} ms"]
    if p["top_kernels"]:
        out += ["", "| CUDA kernel | calls | total ms | % |", "|---|---|---|---|"]
        out += [f"| {k['name'][:110].replace('|', '/')} | {k['calls']} | {k['total_ms']:.2f} | {k['pct']:.1f} |"
                for k in p["top_kernels"]]  # full names (160 chars) in the JSON
    out += ["", "| CPU op (self time) | calls | self ms | % |", "|---|---|---|---|"]
    out += [f"| {k['name'][:110].replace('|', '/')} | {k['calls']} | {k['self_ms']:.2f} | {k['pct']:.1f} |"
            for k in p["top_cpu_ops"][:10]]  # 15 in the JSON
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------
def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, folder: str):
    """Random-weight Qwen2 (DeepSeek-R1-Distill-Qwen-1.5B shape) saved in `dtype`, then loaded the project's way."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tiny_size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    cfg = Qwen2Config(**{**QWEN_1_5B, **(tiny_size if tiny else {})}, use_sliding_window=False,
                      bos_token_id=151_646, eos_token_id=151_643)
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


def build_merged(model, folder: str, device, dtype):
    """What `python -m finllm_pl export --merged` (merge-into trained) gives, in memory: the NF4 base dequantized
    (the exact values training used), the adapter folded in, bf16. Labels like the adapter on the NF4 base."""
    base = load_base_model(folder, "nf4", torch.float32, device if device.type == "cuda" else torch.device("cpu"))
    base = base.dequantize()
    peft_model = add_lora(base, r=4, alpha=8, dropout=0.05, target_modules=TARGETS)
    peft_model.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False)
    merged = peft_model.merge_and_unload().to(dtype).eval()
    merged.config.use_cache = False
    return merged


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def set_lora_dropout(model, on: bool, saved: dict) -> None:
    """Off: every LoRA dropout module becomes Identity (no mask kernel, no copy of x); on: the saved ones return."""
    for name, mod in list(model.named_modules()):
        drops = getattr(mod, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for key in list(drops.keys()):
            if on and (name, key) in saved:
                drops[key] = saved.pop((name, key))
            elif not on and not isinstance(drops[key], torch.nn.Identity):
                saved[(name, key)] = drops[key]
                drops[key] = torch.nn.Identity()


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
def gpu_warmup(model, rows, subset, micro: int, args, device, dtype) -> dict:
    """One untimed forward/backward of the sparse loss at the largest micro-batch (median-length rows), then the
    gradients are dropped: CUDA context, cuBLAS handles and the allocator's big blocks exist before timing."""
    cuda = device.type == "cuda"
    order = sorted(subset, key=lambda i: rows[i]["length"])
    mid = max(0, len(order) // 2 - micro // 2)
    b = collate_train([rows[i] for i in order[mid:mid + micro]], args.pad_id)
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else nullcontext()
    model.train()
    t0 = time.perf_counter()
    ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with autocast:
        loss, _ = loss_sum(model, ids, mask, labels)
    loss.backward()
    sync(device)
    for p in model.parameters():
        p.grad = None
    res = {"micro": len(b["input_ids"]), "tokens": int(b["input_ids"].numel()), "seconds": time.perf_counter() - t0}
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    log(f"== gpu warm-up: micro {res['micro']} x {b['input_ids'].shape[1]} tokens, {res['seconds']:.1f}s (untimed)")
    return res


def run_train(v: Variant, model, rows, subset, args, device, dtype, init_state, profile: bool = False) -> dict:
    """Times `args.steps` optimizer steps after a warm-up. profile=True: 1 warm-up step, then args.profile_steps
    steps under torch.profiler (numbers in res["profile"]; the timing of a profiled run is not a result)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(v.cudnn)
    steps = min(args.steps, args.baseline_steps) if v.name == "baseline" else args.steps
    warmup = args.compile_warmup if v.compile else (1 if v.name == "baseline" else args.warmup)
    if profile:
        steps, warmup = args.profile_steps, (args.compile_warmup if v.compile else 1)
    params = [p for n, p in model.named_parameters() if n in init_state]
    with torch.no_grad():  # every variant starts from the same adapter, so their losses are comparable
        for n, p in model.named_parameters():
            if n in init_state:
                p.data = init_state[n].clone()  # fp32 again even after a bf16 variant
    if v.precision == "bf16":
        for p in params:
            p.data = p.data.to(dtype)
    model.train()  # from_pretrained returns eval mode: LoRA dropout would be off
    set_checkpointing(model, v.ckpt)
    set_lora_dropout(model, v.dropout, args.saved_dropouts)
    if v.compile:
        import torch._dynamo as dynamo

        for key in ("recompile_limit", "cache_size_limit"):  # 28 layers + dynamic shapes outgrow the default 8
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, 64)
        for layer in layers_of(model):
            layer.compile(dynamic=True)  # one graph serves all layers; dynamic: lengths vary per batch
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    torch.manual_seed(args.seed)

    sub_lengths = [rows[i]["length"] for i in subset]
    sampler = LengthGroupedBatchSampler(sub_lengths, v.micro, seed=args.seed, group_by_length=v.grouped)
    batches = [collate_train([rows[subset[j]] for j in b], args.pad_id) for b in sampler]
    for b in batches:
        extra = -b["input_ids"].shape[1] % v.pad_multiple
        if extra:  # padding on the right: masked, unsupervised, so the loss does not change
            for k, val in (("input_ids", args.pad_id), ("attention_mask", 0), ("labels", -100)):
                b[k] = torch.nn.functional.pad(b[k], (0, extra), value=val)
    need = (warmup + steps) * v.accum
    batches = (batches * math.ceil(need / len(batches)))[:need]  # cycle only if the subset is too small
    use_autocast = cuda and dtype != torch.float32 and v.precision == "autocast"
    autocast = torch.autocast("cuda", dtype=dtype) if use_autocast else nullcontext()

    t_start, t_timed, step_times, losses = time.perf_counter(), None, [], []
    counts = {"sup": 0, "tok": 0, "pad": 0}
    res: dict = {}
    it = iter(batches)
    stop_reason = None
    prof_cm = None
    try:
        for step in range(warmup + steps):
            timed = step >= warmup
            if timed and t_timed is None:
                t_timed = time.perf_counter()
                if profile:
                    prof_cm = maybe_profile(True, device, res)
                    prof_cm.__enter__()
            sync(device)
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
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # both recipes clip at 1.0 (HF Trainer's and the project's)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            dt = time.perf_counter() - t0
            step_loss = float(torch.stack(win_loss).sum()) / (v.accum if v.loss_fn == "hf_mean" else max(win_tokens, 1))
            log(f"  {v.name} step {step + 1}/{warmup + steps}{'' if timed else ' (warm-up)'}: {dt:.3f}s loss {step_loss:.4f}")
            if timed:
                step_times.append(dt)
                losses.append(step_loss)
                if not profile and time.perf_counter() - t_timed > args.variant_budget:
                    stop_reason = f"--variant-budget {args.variant_budget:.0f}s"
                    log(f"  {v.name}: stopping after {len(step_times)} timed steps ({stop_reason})")
                    break
    except TimeoutError as e:  # the hard cap fired: keep the timed steps already measured
        if not step_times:
            raise
        stop_reason = str(e)
        log(f"  {v.name}: {e}; keeping {len(step_times)} timed steps")
    finally:
        if prof_cm is not None:
            prof_cm.__exit__(None, None, None)
    t = sum(step_times)
    eff = v.micro * v.accum
    res.update({**asdict(v), "effective_batch": eff, "warmup_steps": warmup, "timed_steps": len(step_times),
                "step_s": t / len(step_times), "s_per_epoch": t / len(step_times) * math.ceil(args.epoch_rows / eff),
                "sup_tok_s": counts["sup"] / t, "tok_s": counts["tok"] / t, "padded_tok_s": counts["pad"] / t,
                "pad_fraction": 1 - counts["tok"] / counts["pad"], "loss": sum(losses) / len(losses),
                "s_per_epoch_median_step": sorted(step_times)[len(step_times) // 2] * math.ceil(args.epoch_rows / eff),
                "step_times": [round(x, 4) for x in step_times], "losses": [round(x, 4) for x in losses],
                "wall_s": time.perf_counter() - t_start, "stopped": stop_reason})
    # Second estimate, from padded tokens: exact epoch padding for this batching, at the measured padded tok/s.
    res["s_per_epoch_by_tokens"] = epoch_padded_tokens(args.all_lengths, v.micro, v.grouped, args.seed) / res["padded_tok_s"]
    return res


def _static_batch(b: dict, sup: int) -> dict:
    """Fixed-shape tensors for a captured step: a 4D causal + padding mask (HF passes 4D masks through, and its
    own mask code checks padding on the CPU: a sync a capture forbids), position ids, and the supervised positions
    as `sup` (hidden index, target, weight) slots per row instead of a boolean gather of data-dependent size."""
    ids, mask, labels = b["input_ids"], b["attention_mask"].bool(), b["labels"]
    B, L = ids.shape
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    target = labels[:, 1:]
    idx = torch.zeros(B, sup, dtype=torch.long)
    tgt = torch.zeros(B, sup, dtype=torch.long)
    w = torch.zeros(B, sup)
    for r in range(B):
        pos = (target[r] != -100).nonzero()[:, 0]
        idx[r, :len(pos)], tgt[r, :len(pos)], w[r, :len(pos)] = pos, target[r, pos], 1.0
    return {"ids": ids, "mask": (causal[None] & mask[:, None, :])[:, None], "pos": torch.arange(L).expand(B, L),
            "idx": idx, "tgt": tgt, "w": w}


def run_train_graphed(v: Variant, model, rows, subset, args, device, dtype, init_state) -> dict:
    """`project` with every optimizer step replayed from a CUDA graph: micro-batches padded to v.pad_multiple
    tokens, one graph per padded length, captured the first time that length comes (after one eager step of it on
    a side stream, as the CUDA-graph docs ask); the graphs share one memory pool (they never run concurrently, and
    nothing a graph leaves behind is read by another). s/epoch = replayed step time x steps + the one-time capture
    seconds. Benchmark only: the trainer does not do this (yet)."""
    import torch.nn.functional as F

    assert device.type == "cuda" and v.accum == 1
    torch.backends.cuda.enable_cudnn_sdp(v.cudnn)
    params = [p for n, p in model.named_parameters() if n in init_state]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init_state:
                p.copy_(init_state[n])
    model.train()
    set_lora_dropout(model, v.dropout, args.saved_dropouts)
    decoder, head, _ = split_head(model)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, capturable=True, foreach=True)
    torch.manual_seed(args.seed)
    sub_lengths = [rows[i]["length"] for i in subset]
    sampler = LengthGroupedBatchSampler(sub_lengths, v.micro, seed=args.seed, group_by_length=v.grouped)
    raw = [collate_train([rows[subset[j]] for j in b], args.pad_id) for b in sampler if len(b) == v.micro]
    sup = max(sum(t != -100 for t in rows[i]["labels"]) for i in subset)  # supervised tokens of the longest answer
    for b in raw:
        extra = -b["input_ids"].shape[1] % v.pad_multiple
        for k, val in (("input_ids", args.pad_id), ("attention_mask", 0), ("labels", -100)):
            b[k] = F.pad(b[k], (0, extra), value=val)
    steps = args.graph_steps
    batches = (raw * math.ceil(steps / len(raw)))[:steps]

    def step(st):
        with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            hidden = _decoder_call(decoder, input_ids=st["ids"], attention_mask=st["mask"], position_ids=st["pos"],
                                   use_cache=False).last_hidden_state
            h = hidden.gather(1, st["idx"][..., None].expand(-1, -1, hidden.shape[-1]))
            ce = F.cross_entropy(head(h.reshape(-1, h.shape[-1])).float(), st["tgt"].reshape(-1), reduction="none")
            loss = (ce * st["w"].reshape(-1)).sum() / st["w"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return loss.detach()

    # Capture every length first, the longest first (shorter graphs then fit in the memory the longer ones
    # freed inside the shared pool), each after one eager step of that shape on a side stream; then put the
    # adapter and AdamW back to their start, so the timed steps follow the same trajectory as `project`.
    graphs, pool = {}, torch.cuda.graph_pool_handle()
    sync(device)
    t0 = time.perf_counter()
    for L in sorted({b["input_ids"].shape[1] for b in batches}, reverse=True):
        st = {k: t.to(device) for k, t in _static_batch(next(b for b in batches if b["input_ids"].shape[1] == L),
                                                        sup).items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for p in params:
                p.grad = None
            step(st)
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None  # this graph's backward allocates its own gradients (no accumulation into others')
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = step(st)
        graphs[L] = (g, st, out)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init_state:
                p.copy_(init_state[n])
        for state in opt.state.values():  # a fresh AdamW: zero moments, step 0 (in place: the graphs hold them)
            for t in state.values():
                t.zero_()
    sync(device)
    capture_s = time.perf_counter() - t0
    step_times, replay_times, losses = [], [], []
    counts = {"sup": 0, "tok": 0, "pad": 0}
    t_start = time.perf_counter()
    for b in batches:
        host = _static_batch(b, sup)
        g, st, out = graphs[b["input_ids"].shape[1]]
        sync(device)
        t0 = time.perf_counter()
        for k, t in host.items():
            st[k].copy_(t, non_blocking=True)
        g.replay()
        sync(device)
        step_times.append(time.perf_counter() - t0)
        replay_times.append(step_times[-1])
        losses.append(float(out))
        counts["sup"] += int(host["w"].sum())
        counts["tok"] += int(b["attention_mask"].sum())
        counts["pad"] += b["input_ids"].numel()
    t = sum(step_times)
    eff = v.micro
    n_epoch = math.ceil(args.epoch_rows / eff)
    replay = sum(replay_times) / max(len(replay_times), 1)
    del graphs, g, st, out  # the graphs' private memory goes back before the next variant
    torch.cuda.empty_cache()
    window = losses[args.warmup: args.warmup + args.steps]  # the steps `project` reports (after its warm-up)
    return {**asdict(v), "effective_batch": eff, "warmup_steps": 0, "timed_steps": len(step_times),
            "step_s": t / len(step_times), "replay_step_s": replay, "captures": len(set(b["input_ids"].shape[1] for b in batches)),
            "capture_s": capture_s, "s_per_epoch": replay * n_epoch + capture_s,
            "s_per_epoch_median_step": sorted(replay_times)[len(replay_times) // 2] * n_epoch + capture_s if replay_times else None,
            "sup_tok_s": counts["sup"] / t, "tok_s": counts["tok"] / t, "padded_tok_s": counts["pad"] / t,
            "pad_fraction": 1 - counts["tok"] / counts["pad"], "loss": sum(window) / len(window),
            "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            "step_times": [round(x, 4) for x in step_times], "losses": [round(x, 4) for x in losses],
            "wall_s": time.perf_counter() - t_start, "stopped": None,
            "s_per_epoch_by_tokens": None}


def cleanup_train(model, v: Variant, device, init_state, args) -> None:
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(True)
    if v.compile:
        for layer in layers_of(model):
            layer._compiled_call_impl = None  # undo Module.compile so later variants and labeling run eager
        import torch._dynamo as dynamo

        dynamo.reset()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.grad = None
            if n in init_state:
                p.data = init_state[n].clone()  # fp32 LoRA weights again (labeling runs on the initial adapter)
    set_checkpointing(model, False)
    set_lora_dropout(model, True, args.saved_dropouts)
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Labeling
# ---------------------------------------------------------------------------------------------------------
LABEL_JOB = re.compile(r"(score|cache|generate)_b(\d+)(_prefix)?(_nomemo)?(_nocudnn)?(_merged)?(_compile)?(?:_pad(\d+))?"
                       r"(?:_tok(\d+))?$")


def label_spec(name: str) -> dict:
    """score|cache|generate _b<batch> [_prefix] [_nomemo] [_nocudnn] [_merged] [_compile] [_pad<N>] [_tok<T>]: method (score = the
    project's one-pass label tree, cache = the previous per-label KV-cache repeat), batch, shared-prefix reuse,
    no prefix cache kept between batches, cuDNN attention off, the merged bf16 model (export --merged) instead of
    NF4 + LoRA, torch.compile per decoder layer (dynamic shapes; compiled during the warm-up, whose time is
    reported), prompt lengths padded up to a multiple of N (fewer distinct shapes), and batches also cut at T padded
    prompt tokens (data.eval_batch_tokens; <batch> is then the most rows a batch holds)."""
    m = LABEL_JOB.match(name)
    if not m:
        raise ValueError(f"labeling job {name!r}: expected e.g. score_b512_prefix, cache_b512_prefix_nocudnn_pad16")
    return {"method": m[1], "batch": int(m[2]), "prefix": bool(m[3]) and m[1] != "generate",
            "memo": m[1] == "score" and not m[4], "cudnn": not m[5], "merged": bool(m[6]), "compile": bool(m[7]),
            "pad_multiple": int(m[8] or 1), "max_tokens": int(m[9]) if m[9] else None}


def label_batches(prompts, batch: int, gen: bool, pad_id: int, label_ids, pad_multiple: int = 1,
                  max_tokens: int | None = None):
    """(batches, order): score_labels' batches are sorted by length (a batch pads to nearly its own length) and
    cut as predict cuts them (finllm_pl.data.budget_batches); `order[j]` is the index into `prompts` of the j-th
    row fed, so outputs can be put back in input order."""
    order = list(range(len(prompts))) if gen else sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    cuts = budget_batches(order, [len(p) for p in prompts], batch, max_tokens)
    order = [i for idx in cuts for i in idx]
    batches = [collate_prompts([prompts[i] for i in idx], pad_id, label_ids) for idx in cuts]
    for b in batches:  # extra left padding up to a multiple (masked: the scores do not change)
        extra = -b["prompt_ids"].shape[1] % pad_multiple
        if extra:
            b["prompt_ids"] = torch.nn.functional.pad(b["prompt_ids"], (extra, 0), value=pad_id)
            b["prompt_mask"] = torch.nn.functional.pad(b["prompt_mask"], (extra, 0), value=0)
    return batches, order


def run_label(name: str, model, prompts, label_ids, args, device, dtype, profile: bool = False) -> dict:
    """rows/s of one labeling job (see `label_spec`) over `prompts`. Scoring keeps the label probabilities
    (res["_probs"], input order) so methods can be compared; generate stops after --gen-budget seconds of batches.
    With --label-passes 2 the rows are labeled twice and the second pass is the result (every shape seen once:
    what a long predict job sees), the first pass's rows/s kept as rows_s_first_pass."""
    cuda = device.type == "cuda"
    spec = label_spec(name)
    batch, prefix, gen = spec["batch"], spec["prefix"], spec["method"] == "generate"
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else nullcontext()
    batches, order = label_batches(prompts, batch, gen, args.pad_id, label_ids, spec["pad_multiple"], spec["max_tokens"])
    min_prefix = MIN_PREFIX if prefix else 0
    scorer = score_labels_cache if spec["method"] == "cache" else score_labels
    memo = {} if spec["memo"] else None  # one memo per job and pass, as predict keeps one per run
    model.eval()
    res: dict = {"name": name, **spec, "prefix_reuse": prefix}
    if not gen:  # what the prefix path skips (computed on the CPU copies, before timing)
        shared = [common_prefix_length(b["prompt_ids"], b["prompt_mask"]) for b in batches]
        used = [P if (prefix and P >= MIN_PREFIX and len(b["prompt_ids"]) > 1) else 0 for P, b in zip(shared, batches)]
        res.update({"mean_shared_prefix": sum(shared) / len(shared),
                    "prefix_batches": sum(u > 0 for u in used) / len(used),
                    "computed_prompt_tokens": sum(u + b["prompt_ids"].shape[0] * (b["prompt_ids"].shape[1] - u)
                                                  for u, b in zip(used, batches))})

    def reset_memo():
        if memo is not None:
            memo.clear()

    def one(b, new_tokens=args.gen_tokens):
        ids, mask = b["prompt_ids"].to(device), b["prompt_mask"].to(device)
        if gen:  # the tutorial's way: greedy decoding of a few tokens, answer parsed from the text afterwards
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=args.pad_id, eos_token_id=args.eos_id)
            return out.shape[1] - ids.shape[1]
        extra = {"prefix_memo": memo} if memo is not None else {}
        return scorer(model, ids, mask, b["label_ids"].to(device), b["label_mask"].to(device), min_prefix=min_prefix,
                      **extra)

    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(spec["cudnn"])
    if spec["compile"]:
        for layer in layers_of(model):
            layer.compile(dynamic=True)
    try:
        return _timed_label(res, one, reset_memo, batches, order, prompts, label_ids, args, device, autocast, gen,
                            profile)
    finally:
        if spec["compile"]:
            import torch._dynamo as dynamo

            for layer in layers_of(model):
                layer._compiled_call_impl = None
            dynamo.reset()
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(True)


def _timed_label(res, one, reset_memo, batches, order, prompts, label_ids, args, device, autocast, gen, profile):
    """The warm-up (compiling, for a compiled job), then --label-passes timed passes over all batches."""
    with torch.no_grad(), autocast:
        t_warm = time.perf_counter()
        for b in sorted(batches, key=lambda b: -b["prompt_ids"].numel())[:2]:  # warm-up: the 2 largest batches
            one(b, 2)
        sync(device)
        res["warmup_s"] = time.perf_counter() - t_warm
        if profile:  # 2 middle batches under the profiler, then done (a profiled run times nothing)
            mid = len(batches) // 2
            with maybe_profile(True, device, res):
                for b in batches[max(0, mid - 1): mid + 1]:
                    one(b)
            return res
        firsts = []
        for _ in range(args.label_passes):
            reset_memo()  # each pass starts like a fresh predict run
            t0 = time.perf_counter()
            outs, done = [], 0
            for b in batches:
                o = one(b)
                outs.append(o if gen else o.float().softmax(-1).cpu())  # .cpu() syncs: part of the cost, as in predict
                done += len(b["prompt_ids"])
                if gen and time.perf_counter() - t0 > args.gen_budget:
                    break
            sync(device)
            t = time.perf_counter() - t0
            firsts.append(done / t)
            if gen:
                break
    if len(firsts) > 1:
        res["rows_s_first_pass"] = firsts[0]
    res.update({"rows": done, "seconds": t, "rows_s": done / t,
                "mean_prompt_tokens": sum(len(prompts[i]) for i in order[:done]) / done,
                "padded_prompt_tokens": sum(b["prompt_ids"].numel() for b in batches[:len(outs)])})
    if gen:
        res["mean_new_tokens"] = sum(outs) / len(outs)
    else:
        probs = torch.empty(len(prompts), len(label_ids))
        probs[torch.tensor(order)] = torch.cat(outs)
        res["_probs"] = probs
    log(f"  {res['name']}: {done} rows in {t:.2f}s = {res['rows_s']:.1f} rows/s (warm-up {res['warmup_s']:.1f}s)")
    return res


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Same labels (argmax) and the largest probability difference between two [N, K] label distributions."""
    return {"label_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "max_prob_diff": float((a - b).abs().max())}


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def tables(results: dict) -> str:
    out = ["| variant | micro | accum | grad ckpt | s/epoch | s/epoch (median step) | sup tok/s | tok/s | padded tok/s | "
           "peak GiB | loss | x baseline | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
        head = f"| {r['name']} | {r['micro']} | {r['accum']} | {'on' if r['ckpt'] else 'off'} | "
        if "error" in r or "skipped" in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            out.append(head + f"{why[:100].replace('|', '/')} |||||||| {r.get('note', '')} |")
            continue
        out.append(head + f"{r['s_per_epoch']:,.1f} | {fmt(r.get('s_per_epoch_median_step'), ',.1f')} | {r['sup_tok_s']:,.0f} | {r['tok_s']:,.0f} | "
                   f"{r['padded_tok_s']:,.0f} | {fmt(r.get('peak_gib'), '.2f')} | {r['loss']:.3f} | "
                   f"{fmt(r.get('x_baseline'), '.2f')} | {r.get('note', '')} |")
    out.append(f"\ns/epoch: time per optimizer step x ceil({results['config']['epoch_rows']} / (micro x accum)); "
               "median step: the same from the median step (robust to a recompile or an allocator stall; "
               "step_times in the JSON); x baseline = baseline s/epoch / this s/epoch (higher is faster). Loss: random weights, ~ln(vocab); "
               "compare losses of variants with the same effective batch and recipe.")
    out += ["", "| labeling | method | batch | prefix reuse | cuDNN attn | pad to | rows | rows/s | rows/s 1st pass | "
                "peak GiB | x generate | label agreement | max prob diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["label"]:
        if "error" in r or "skipped" in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            out.append(f"| {r['name']} | {r.get('method', '-')} | {r.get('batch', '-')} | {why[:100].replace('|', '/')} ||||||||||")
            continue
        out.append(f"| {r['name']} | {r['method']} | {r['batch']} | {'on' if r.get('prefix_reuse') else 'off'} | "
                   f"{'on' if r.get('cudnn', True) else 'off'} | {r.get('pad_multiple', 1)} | {r['rows']} | "
                   f"{r['rows_s']:,.1f} | {fmt(r.get('rows_s_first_pass'), ',.1f')} | "
                   f"{fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('x_generate'), '.1f')} | "
                   f"{fmt(r.get('label_agreement'), '.4f')} | {fmt(r.get('max_prob_diff'), '.2e')} |")
    out.append("\nmethod: score = one pass over prompt + label tree (the project's), cache = the previous per-label "
               "KV-cache repeat. label agreement / max prob diff: against the first scoring job of the run "
               "(`compared_with` in the JSON), same rows (argmax equal; largest |p - p'| "
               "over rows and labels). generate: the same rows in input order, stopped after --gen-budget seconds.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, tokenizer_config.json (+ chat template)")
    ap.add_argument("--data", required=True, help="instruction JSONL (instruction/input/output rows)")
    ap.add_argument("--out", default="results/gpu_throughput.json")
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model, float32, CPU, small batches")
    ap.add_argument("--cpu", action="store_true", help="the full-size model on CPU in float32, small batches: for "
                    "CPU labeling rows/s, e.g. --cpu --variants 'score_*,generate_*' --label-rows 64")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant (default 20; tiny 2)")
    ap.add_argument("--baseline-steps", type=int, default=3, help="timed steps of the (slow) baseline")
    ap.add_argument("--graph-steps", type=int, default=120, help="steps of the CUDA-graph variants (captures included)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 2; tiny and baseline 1)")
    ap.add_argument("--compile-warmup", type=int, default=3, help="untimed steps of the compile variant")
    ap.add_argument("--variants", default=None,
                    help="comma list of names or globs, e.g. 'baseline,project*,score_*' (default: all; --tiny: all "
                         "but project_compile, which takes ~80 s to compile on a CPU)")
    ap.add_argument("--profile", default="", help="comma list of variant names (training or labeling) to run again "
                    "for 2 steps / 2 batches under torch.profiler, e.g. 'project,score_b512_prefix'")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--label-rows", type=int, default=None, help="rows labeled by every labeling variant (default 4096; tiny 64)")
    ap.add_argument("--gen-budget", type=float, default=None,
                    help="generate stops after this many seconds of batches (same rows, fewer of them; default 20; tiny 10)")
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--label-jobs", default=None, help="comma list of labeling jobs, the first scoring one being the "
                    "reference for label agreement: (score|cache|generate)_b<batch>[_prefix][_nocudnn][_pad<N>]; "
                    "score = the project's one-pass label tree, cache = the previous per-label cache repeat")
    ap.add_argument("--label-passes", type=int, default=1, help="label the rows this many times, report the last pass")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--variant-budget", type=float, default=45.0, help="stop timing a variant after this many timed seconds")
    ap.add_argument("--variant-timeout", type=float, default=120.0, help="hard cap per variant (SIGALRM), 0 = none")
    ap.add_argument("--compile-timeout", type=float, default=120.0, help="hard cap of project_compile, compiling included")
    ap.add_argument("--total-budget", type=float, default=0.0,
                    help="seconds for the whole run (0 = none): a job that cannot start with at least 20 s left (90 s "
                         "for compile) is skipped, and each job's hard cap shrinks to the time left")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="tokenization cache (default: the project's)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    tiny = args.tiny
    args.steps = args.steps or (2 if tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    on_cpu = tiny or args.cpu
    args.label_rows = args.label_rows or (64 if on_cpu else 4096)
    args.gen_budget = args.gen_budget if args.gen_budget is not None else (10.0 if tiny else 60.0 if on_cpu else 20.0)
    args.saved_dropouts = {}
    eff = 4 if tiny else 32
    b1, b2, b3 = (16, 32, 64) if tiny else (8, 16, 32) if on_cpu else (256, 512, 1024)
    gen_batch = 8 if on_cpu else 64
    # The first scoring job is the reference the others' labels are compared with: the previous exact method.
    label_jobs = [j.strip() for j in (args.label_jobs or (
        f"cache_b{b2},cache_b{b2}_prefix,score_b{b1},score_b{b1}_prefix,score_b{b2},score_b{b2}_prefix,"
        f"score_b{b3}_prefix,generate_b{gen_batch}")).split(",") if j.strip()]
    for j in label_jobs:
        try:
            label_spec(j)
        except ValueError as e:
            log(f"--label-jobs: {e}")
            return 2
    pats = [p.strip() for p in (args.variants or "*").split(",") if p.strip()]
    skip = {"project_compile"} if tiny and args.variants is None else set()
    if on_cpu:  # CUDA graphs need CUDA
        skip |= {v.name for v in variants(4 if tiny else 32) if v.graphs}
    wanted = lambda name: name not in skip and any(fnmatch.fnmatch(name, p) for p in pats)  # noqa: E731
    profile_names = {p.strip() for p in args.profile.split(",") if p.strip()}
    all_train = variants(eff)
    unknown = profile_names - {v.name for v in all_train} - set(label_jobs)
    if unknown:
        log(f"--profile: unknown variant(s) {sorted(unknown)}")
        return 2

    if not on_cpu and not torch.cuda.is_available():
        log("no CUDA device: run with --tiny or --cpu on CPU")
        return 2
    device = torch.device("cpu") if on_cpu else torch.device("cuda:0")
    dtype = torch.float32 if on_cpu else torch.bfloat16  # bf16 on CPUs is ~20x slower than fp32

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

    train_vs = [v for v in all_train if wanted(v.name)]
    need = max([(args.graph_steps if v.graphs else max(args.warmup, args.compile_warmup) + args.steps) * v.micro * v.accum
                for v in train_vs] or [0])
    subset = seeded_subset(len(rows), math.ceil(need / 64) * 64, args.seed)
    results = {
        "env": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "bitsandbytes": bitsandbytes.__version__, "tokenizer": os.path.abspath(args.tokenizer),
                "tokenizer_vocab": len(tokenizer), "compute_dtype": str(dtype),
                "argv": sys.argv[1:] if argv is None else list(argv)},
        "config": {"tiny": tiny, "cpu": args.cpu, "effective_batch": eff, "steps": args.steps, "baseline_steps": args.baseline_steps,
                   "warmup": args.warmup, "train_subset_rows": len(subset), "epoch_rows": args.epoch_rows,
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "targets": TARGETS}, "lr": 1e-4, "seed": args.seed,
                   "label_rows": args.label_rows, "gen_budget_s": args.gen_budget, "min_prefix": MIN_PREFIX,
                   "total_budget_s": args.total_budget},
        "data": data_stats, "warmup": None, "train": [], "label": [], "profile": {},
    }
    out = Path(args.out)

    try:
        folder_cm = tempfile.TemporaryDirectory(prefix="finllm_bench_")  # kept until the end: `_merged` reloads it
        model, info = build_model(tiny, device, dtype, folder_cm.name)
    except Exception as e:  # nothing can be measured without the model: say why in the results file too
        results["error"] = f"model build/load failed: {type(e).__name__}: {e}"[:1000]
        write_json(out, results)
        raise
    results["model"] = {k: v for k, v in info.items() if k != "config"}
    init_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def time_left() -> float:
        return math.inf if args.total_budget <= 0 else args.total_budget - (time.perf_counter() - t_all)

    def guarded(job: dict, fn, timeout: float, min_left: float = 20.0) -> dict:
        """Run one measurement; an OOM, a compile failure or a timeout is recorded and the next one still runs."""
        left = time_left()
        if left < min_left:
            log(f"  {job['name']}: skipped ({left:.0f}s left of --total-budget {args.total_budget:.0f}s)")
            return {**job, "skipped": f"{max(left, 0):.0f}s left of --total-budget"}
        if left < math.inf:
            timeout = min(timeout, left) if timeout > 0 else left
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

    def profile_train(v: Variant) -> None:
        log(f"== profile {v.name}: {args.profile_steps} steps under torch.profiler")
        res = guarded({"name": v.name},
                      lambda: run_train(v, model, rows, subset, args, device, dtype, init_state, profile=True),
                      args.compile_timeout if v.compile else args.variant_timeout)
        cleanup_train(model, v, device, init_state, args)
        record_profile(v.name, res)

    def record_profile(name: str, res: dict) -> None:
        p = res.get("profile") or {"error": res.get("error") or res.get("skipped") or "no profile"}
        if "peak_gib" in res:
            p["peak_gib"] = res["peak_gib"]
        results["profile"][name] = p
        write_json(out, results)
        log(profile_text(name, p))

    def train_one(v: Variant) -> None:
        log(f"== {v.name}: micro {v.micro} x accum {v.accum}, ckpt {v.ckpt}, loss {v.loss_fn}, grouped {v.grouped}, "
            f"dropout {v.dropout}, precision {v.precision}")
        fn = run_train_graphed if v.graphs else run_train
        res = guarded(asdict(v), lambda: fn(v, model, rows, subset, args, device, dtype, init_state),
                      args.compile_timeout if v.compile else args.variant_timeout, 90.0 if v.compile else 20.0)
        cleanup_train(model, v, device, init_state, args)
        if "error" not in res and "skipped" not in res:
            log(f"  {v.name}: {res['step_s']:.3f}s/step, {res['s_per_epoch']:,.1f} s/epoch, {res['tok_s']:,.0f} tok/s, "
                f"peak {fmt(res.get('peak_gib'), '.2f')} GiB")
        results["train"].append(res)
        write_json(out, results)
        if v.name in profile_names and "error" not in res and "skipped" not in res:
            profile_train(v)

    # 1. GPU warm-up, untimed, at the largest micro-batch of the run
    if train_vs:
        micro = max(v.micro for v in train_vs)
        try:
            results["warmup"] = gpu_warmup(model, rows, subset, micro, args, device, dtype)
        except Exception as e:  # an OOM here says the largest variant will fail too; the others still run
            results["warmup"] = {"micro": micro, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]}
            log(f"== gpu warm-up at micro {micro} failed: {results['warmup']['error']}")
            for p in model.parameters():
                p.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_json(out, results)

    # 2. training variants (compile last of all, after labeling)
    for v in train_vs:
        if not v.compile:
            train_one(v)

    # 3. labeling: score with and without the shared prefix, same rows; generate as the baseline
    label_ids = formatter.encode_labels(list(DEFAULT_LABELS))
    pick = seeded_subset(len(rows), min(args.label_rows, len(rows)), args.seed + 1)
    prompts = [rows[i]["input_ids"][: rows[i]["prompt_len"]] for i in pick]  # == formatter.encode_prompt(...)
    probs, merged = {}, None
    for name in label_jobs:
        if not wanted(name):
            continue
        log(f"== {name}")
        if label_spec(name)["merged"] and merged is None:
            t0 = time.perf_counter()
            merged = build_merged(model, folder_cm.name, device, dtype)
            results["merged_build_s"] = time.perf_counter() - t0
            log(f"  merged bf16 model built in {results['merged_build_s']:.1f}s")
        m = merged if label_spec(name)["merged"] else model
        res = guarded({"name": name, **label_spec(name)},
                      lambda: run_label(name, m, prompts, label_ids, args, device, dtype), args.variant_timeout)
        if "_probs" in res:
            probs[name] = res.pop("_probs")
            ref = next(iter(probs))  # the first scoring job of the run is the reference of all the others
            if ref != name:
                res.update(agreement(probs[name], probs[ref]), compared_with=ref)
                log(f"  {name} vs {ref}: label agreement {res['label_agreement']:.4f}, max prob diff "
                    f"{res['max_prob_diff']:.2e}")
        results["label"].append(res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(out, results)
        if name in profile_names and "error" not in res and "skipped" not in res:
            log(f"== profile {name}: 2 batches under torch.profiler")
            pres = guarded({"name": name}, lambda: run_label(name, m, prompts, label_ids, args, device, dtype,
                                                             profile=True), args.variant_timeout)
            record_profile(name, pres)

    # 4. the slow one last: torch.compile (what is left of the budget)
    for v in train_vs:
        if v.compile:
            train_one(v)

    base = next((r for r in results["train"] if r["name"] == "baseline" and "s_per_epoch" in r), None)
    for r in results["train"]:
        if base and "s_per_epoch" in r:
            r["x_baseline"] = base["s_per_epoch"] / r["s_per_epoch"]  # speed-up: >1 is faster than the baseline
    gen = next((r for r in results["label"] if r["name"].startswith("generate") and "rows_s" in r), None)
    for r in results["label"]:
        if gen and "rows_s" in r:
            r["x_generate"] = r["rows_s"] / gen["rows_s"]
    results["wall_s"] = time.perf_counter() - t_all
    write_json(out, results)
    log(f"\nwrote {out} ({results['wall_s']:.0f}s in all); {results['env']['device']}, data "
        f"{data_stats['mean_tokens_per_row']:.1f} tokens/row, {data_stats['mean_supervised_tokens_per_row']:.2f} "
        f"supervised/row, prompt style {data_stats['prompt_style']}\n")
    for name, p in results["profile"].items():
        log(profile_text(name, p) + "\n")
    log(tables(results))
    # Exit 1 when a measurement failed; the optional compile variant failing (or anything skipped) is a result.
    return 1 if any("error" in r and not r.get("compile") for r in results["train"] + results["label"]) else 0


if __name__ == "__main__":
    sys.exit(main())
