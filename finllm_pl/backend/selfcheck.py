"""Every fast component proves itself against the plain backend, on this run's architecture, or steps aside.

Before the real model loads, a stand-in of it is built: its config (a layer of each attention type it has, a small
vocabulary), random weights, loaded through the very function the run loads with (same quantization, compute dtype,
device and attention implementation), with a random non-zero LoRA of the run's shape. Then the plain backend and
the fast one, one component at a time (with what it needs), compute on the same made-up batches what the run will
compute: a training batch's loss and LoRA gradients (fit), a validation loss and label scores. A component whose
results differ beyond the tolerance, or that raises, is switched off for this run with one line saying so.

Tolerance: in fp32 the fast result must equal the plain one up to float rounding (rtol 1e-4 on losses and scores,
1e-3 on the gradients' norm). In bf16/fp16 the plain result itself is off the exact (fp32) one by rounding, so the
fast one may be off it by at most 3x as much (+ a small floor): a wrong mask, a missing logit scale or a window that
is not applied misses by far more. Sequences are long enough to cross a sliding window shorter than data.max_length.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .. import model as hf
from ..batching import collate_prompts, collate_train
from .fast import COMPONENTS, FastBackend, closure
from .plain import PlainBackend
from .static import StaticCollate
from .tree import windows

CHECK_VOCAB = 4096  # the stand-in's vocabulary at most (the real one's embedding and head would only cost time)
PREFIX = 12  # tokens the made-up rows share (template + instruction)


@dataclass
class Decision:
    """Which components run, and why each other one does not."""

    on: list[str] = field(default_factory=list)
    off: dict[str, str] = field(default_factory=dict)  # component -> reason

    def lines(self) -> list[str]:
        out = [f"model.backend fast: {', '.join(self.on) or 'no component'} proved equal to the plain path"]
        out += [f"model.backend fast: {c} switched off for this run: {why}" for c, why in self.off.items()]
        return out


@dataclass
class RunShape:
    """What the stand-in must mirror and what the run will do."""

    model_name_or_path: str
    quantization: str
    compute_dtype: torch.dtype
    device: torch.device
    lora_r: int
    lora_alpha: int
    lora_target_modules: Sequence[str]
    attn_implementation: Optional[str]
    trust_remote_code: bool
    max_length: int
    training: bool


# -- the stand-in -----------------------------------------------------------------------------------------------
def stand_in_config(name: str, trust_remote_code: bool):
    """The model's config cut to one layer of each attention type it uses and a small vocabulary."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf.resolve_model_path(name), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # (a folder saved 4-bit: the stand-in is saved plain, quantized as
        del config.quantization_config        # the run loads it, by RunShape.quantization)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        kept = list(dict.fromkeys(types))  # first of each kind, in order
        config.layer_types = kept
        config.num_hidden_layers = len(kept)
    else:
        config.num_hidden_layers = 1
    for key in ("vocab_size",):
        if getattr(config, key, 0) > CHECK_VOCAB:
            setattr(config, key, CHECK_VOCAB)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= CHECK_VOCAB:
            setattr(config, key, 0)
    return config


def build_stand_in(shape: RunShape, folder: str, dtype: torch.dtype, dequantize: bool = False):
    """The stand-in loaded from `folder` as the run loads its model, with a random non-zero LoRA (dropout off:
    the comparisons are about the math, and the fast path draws its masks in another order)."""
    base = hf.load_base_model(folder, shape.quantization, dtype, shape.device, shape.attn_implementation,
                              shape.trust_remote_code)
    if dequantize:
        base = base.dequantize()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hf.add_lora(base, shape.lora_r, shape.lora_alpha, 0.0, shape.lora_target_modules)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, device="cpu") * 0.5)
    return model


def _save_random(config, folder: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # norms initialised to ones hide a wrong norm; weights drawn wider than init does
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.3 * torch.randn(p.shape))
    # (not save_pretrained: under torch.distributed it writes on rank 0 only, and every rank builds its stand-in)
    from safetensors.torch import save_model

    config.save_pretrained(folder)
    save_model(model, f"{folder}/model.safetensors", metadata={"format": "pt"})


# -- the made-up batches ------------------------------------------------------------------------------------------
def batches(config, shape: RunShape, device: torch.device) -> tuple[dict, dict]:
    """(training batch, validation batch) on `device`: 4 rows sharing a PREFIX-token prefix, of different lengths
    (longer than the smallest sliding window when that is shorter than data.max_length), answers of 1-3 tokens.
    Drawn on the host whatever the default device (Lightning's configure_model runs under the GPU's)."""
    with torch.device("cpu"):
        return _batches(config, shape, device)


def _batches(config, shape: RunShape, device: torch.device) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    vocab = min(config.vocab_size, CHECK_VOCAB)
    window = min((w for w in windows(config).values() if w), default=None)
    longest = 40 if not window or window >= shape.max_length else min(shape.max_length - 4, window + 24)
    prefix = torch.randint(1, vocab, (PREFIX,), generator=g).tolist()
    lengths = [longest, longest - 7, longest - 13, longest - 3]
    rows, prompts = [], []
    for n, answer in zip(lengths, (3, 1, 2, 2)):
        ids = prefix + torch.randint(1, vocab, (n - PREFIX,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - answer) + ids[n - answer:]})
        prompts.append(ids[: n - answer])
    labels = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in (1, 3, 2)]
    train = StaticCollate(0, 8, 4)(rows)
    val = collate_train(rows, 0)
    val.update(collate_prompts(prompts, 0, labels))
    move = lambda b: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    return move(train), move(val)


# -- measuring one backend --------------------------------------------------------------------------------------
def measure(backend: PlainBackend, train: dict, val: dict, training: bool, autocast_dtype: torch.dtype) -> dict:
    """What the run computes with this backend: training loss + LoRA gradients, validation loss, label scores."""
    model = backend.model
    device = next(model.parameters()).device
    low = autocast_dtype != torch.float32
    ctx = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=low)  # noqa: E731 (as Lightning's)
    out: dict[str, Any] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    if training:
        model.train()
        for p in params:
            p.grad = None
        with ctx():
            loss, n = backend.train_step(train, lambda t: t.backward(), lambda last: contextlib.nullcontext())
        out["train_loss"] = float(loss) / max(float(n), 1.0)
        out["grads"] = torch.cat([p.grad.float().reshape(-1) for p in params if p.grad is not None]).cpu()
        for p in params:
            p.grad = None
    model.eval()
    with torch.no_grad(), ctx(), backend.labeling():
        loss, n = backend.loss(val)
        out["val_loss"] = float(loss) / max(float(n), 1.0)
        out["scores"] = backend.score(val).float().cpu()
    return out


def difference(a: dict, b: dict) -> dict[str, float]:
    """How far b is from a, per quantity (relative for losses and gradients, absolute for scores)."""
    d = {}
    for key in ("train_loss", "val_loss"):
        if key in a:
            d[key] = abs(a[key] - b[key]) / max(abs(a[key]), 1e-6)
    if "grads" in a:
        d["grads"] = float((a["grads"] - b["grads"]).norm() / a["grads"].norm().clamp(min=1e-12))
    d["scores"] = float((a["scores"] - b["scores"]).abs().max())
    return d


WHAT = {"train_loss": "training loss differs", "val_loss": "validation loss differs",
        "grads": "LoRA gradients differ", "scores": "label scores differ"}
FP32_TOLERANCE = {"train_loss": 1e-4, "val_loss": 1e-4, "grads": 1e-3, "scores": 1e-3}
LOW_FLOOR = {"train_loss": 2e-3, "val_loss": 2e-3, "grads": 2e-2, "scores": 2e-2}


def verdict(ref: dict, got: dict, truth: Optional[dict]) -> Optional[str]:
    """None when `got` computes what `ref` does within the tolerance, else a short reason."""
    if any(not torch.isfinite(torch.as_tensor(got[k])).all() for k in got):
        return "non-finite results"
    if truth is None:  # fp32: equal to the plain path up to rounding
        bad = {k: v for k, v in difference(ref, got).items() if v > FP32_TOLERANCE[k]}
    else:  # low precision: no further from the fp32 result than 3x the plain path's own rounding
        plain, fast = difference(truth, ref), difference(truth, got)
        bad = {k: v for k, v in fast.items() if v > 3 * plain[k] + LOW_FLOOR[k]}
    if not bad:
        return None
    k, v = max(bad.items(), key=lambda kv: kv[1])
    return f"its {WHAT[k]} from the plain path's by {v:.2g}"


# -- the check ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Building and loading a random stand-in is noisy (progress bars, 'dequantized in float32', init warnings);
    the decision is what is reported. transformers' verbosity and progress bars are restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check(shape: RunShape, wanted: Sequence[str], make: Callable[..., FastBackend] = FastBackend) -> Decision:
    """Which of the `wanted` components this run may use (see the module's docstring)."""
    decision = Decision()
    wanted = [c for c in COMPONENTS if c in wanted]
    if not wanted:
        return decision
    config = stand_in_config(shape.model_name_or_path, shape.trust_remote_code)
    low = shape.compute_dtype != torch.float32
    with tempfile.TemporaryDirectory(prefix="finllm-stand-in-") as folder, _quiet():
        _save_random(config, folder)
        train, val = batches(config, shape, shape.device)
        quantized = shape.quantization != "none"
        models = {False: build_stand_in(shape, folder, shape.compute_dtype)}
        if "dequantize" in wanted and quantized:
            models[True] = build_stand_in(shape, folder, shape.compute_dtype, dequantize=True)
        truth = None
        if low:  # the same weights in fp32: how far rounding alone takes the plain path
            fp32 = build_stand_in(shape, folder, torch.float32)
            truth = measure(PlainBackend(fp32, torch.float32), train, val, shape.training, torch.float32)
            del fp32
        ref = measure(PlainBackend(models[False], shape.compute_dtype), train, val, shape.training,
                      shape.compute_dtype)

        def attempt(components: set[str]) -> Optional[str]:
            model = models[True] if "dequantize" in components and True in models else models[False]
            try:
                backend = make(model, shape.compute_dtype, components - {"dequantize"})
                return verdict(ref, measure(backend, train, val, shape.training, shape.compute_dtype), truth)
            except Exception as e:  # a component that raises on this architecture steps aside too
                return f"it raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")

        for c in wanted:
            missing = [d for d in closure([c]) - {c} if d not in decision.on]
            if missing:
                decision.off[c] = f"it needs {', '.join(sorted(missing))}"
                continue
            if c == "dequantize" and not quantized:
                decision.off[c] = "the base is not quantized"
                continue
            if c in ("cuda_graphs", "folded_attention") and shape.device.type != "cuda":
                decision.off[c] = "no CUDA device"
                continue
            if c == "cuda_graphs":  # (the same kernels as the static step; the real graph proves itself at capture)
                decision.on.append(c)
                continue
            why = attempt(closure([c]))
            if why:
                decision.off[c] = why
            else:
                decision.on.append(c)
        if len(decision.on) > 1:
            why = attempt(set(decision.on) - {"cuda_graphs"})
            if why:  # together they differ where each alone did not: none of them runs
                decision.off.update({c: f"together with the others, {why}" for c in decision.on})
                decision.on = []
    return decision
