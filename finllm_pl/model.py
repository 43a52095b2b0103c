"""Hugging Face / PEFT plumbing with no Lightning in it: load, quantize, add LoRA, export, merge.

Kept apart from the LightningModule so each piece can be used (and tested) on its own: a user who only wants the
adapter of a finished run loads it with plain transformers + peft (`load_base_model` + `load_adapter`); folding
it into the base is in export.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from .errors import ModelError
from .files import atomic_dir

Quantization = Literal["nf4", "fp4", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
PROMPT_FILE = "prompt_format.json"
CONFIG_FILE = "finllm_config.yaml"


def resolve_model_path(name: str) -> str:
    """`builtin:<name>` -> a model the project builds offline; an existing folder -> itself; else a hub id.

    A value that looks like a path (starts with '.', '/', '~' or names a models/ subfolder) but does not exist is
    an error here, rather than a confusing "repository not found" from the hub client later.
    """
    if name.startswith("builtin:"):
        from .assets import ensure_builtin

        try:
            return str(ensure_builtin(name.split(":", 1)[1]))
        except ValueError as e:
            raise ModelError(f"model.model_name_or_path={name!r}: {e}") from None
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not any(os.path.exists(os.path.join(expanded, f))
                   for f in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            raise ModelError(f"model.model_name_or_path={name!r}: folder has no config.json; is it a model folder?")
        return expanded
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise ModelError(
            f"model.model_name_or_path={name!r}: no such folder; check the path, or give a hub id like "
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (needs network), or builtin:tiny-deepseek"
        )
    return name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(parts[0])


def torch_dtype(name: DType, device: Optional[torch.device] = None) -> torch.dtype:
    """Compute dtype: 'auto' is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 is ~20x slower there)."""
    if name != "auto":
        return getattr(torch, name)
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:  # e.g. Llama: padding is masked out of the loss anyway
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name: str,
    quantization: Quantization = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    device: Optional[torch.device] = None,
    attn_implementation: Optional[str] = None,
    trust_remote_code: bool = False,
    quant_storage: Optional[torch.dtype] = None,
):
    """The base model, 4-bit (NF4/FP4, double quant) or plain, placed whole on `device`.

    4-bit models refuse `.to()`, so placement happens here through `device_map={"": index}`: one full copy per
    process, which is what DDP needs (`device_map="auto"` would split it over GPUs and break DDP).
    quant_storage: the dtype the packed 4-bit weights are stored as (uint8 by default; FSDP shards them stored as the
    compute dtype: the same bytes, the same numbers).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(name)
    device = device or torch.device("cpu")
    kwargs: dict[str, Any] = {"dtype": compute_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage or torch.uint8,
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else device.type}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if quantization == "none":
        model.to(device)
    elif device.type == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs on the first eval forward, one way only;
        # training after a validation pass then fails ("view of a leaf Variable ... in-place"). Keep one layout.
        for mod in model.modules():
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target (q_proj, ...), excluding the output head."""
    import bitsandbytes as bnb  # noqa: F401  (registers Linear4bit)

    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.split(".")[-1])
    head = model.get_output_embeddings()
    return sorted(n for n in names if not (head is not None and n in ("lm_head",)))


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: Sequence[str],
             gradient_checkpointing: bool = False, use_dora: bool = False):
    """Wrap `model` with a fresh LoRA adapter; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    missing = [m for m in target_modules if m not in available]
    if missing:
        raise ModelError(
            f"model.lora_target_modules: {missing} not in this model; its linear layers are: {', '.join(available)}"
        )
    if r < 1:
        raise ModelError(f"model.lora_r must be >= 1, got {r}")
    # Unlike peft's prepare_model_for_kbit_training we do not upcast every non-quantized weight to fp32: the
    # embeddings and LM head of a 152k vocabulary would take ~1 GB each and the head would be re-cast on every
    # forward. Mixed precision (autocast) already runs the norms and the loss in fp32.
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM", use_dora=use_dora)
    return get_peft_model(model, config)


def load_adapter(model, adapter_dir: str, trainable: bool = False):
    """Attach a saved PEFT adapter folder to a base model."""
    from peft import PeftModel

    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise ModelError(f"{adapter_dir}: not an adapter folder (no adapter_config.json); give the folder fit exported")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (pickle.UnpicklingError, EOFError, OSError) as e:  # weights_only refuses pickles that would run code
        raise ModelError(
            f"{adapter_dir}: adapter weights are corrupted or not safe to load ({str(e).splitlines()[0][:120]}); "
            "export the adapter again (adapter_model.safetensors)"
        ) from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelError(
            f"{adapter_dir}: adapter does not fit this base model ({str(e).splitlines()[0][:200]}); "
            "use the base model it was trained on"
        ) from None


def export_adapter(model, tokenizer, out_dir: str, prompt: dict, config_yaml: Optional[str] = None,
                   extra: Optional[dict[str, str]] = None) -> Path:
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors), tokenizer, prompt format, config.

    Loadable with `PeftModel.from_pretrained(base, out_dir)`; written to a temp folder and renamed. The base model
    is recorded as the user gave it (`prompt["base_model"]`: a hub id, a path as given, or builtin:<name>), not as
    the folder it was loaded from (for a builtin, a cache path of this machine); the model card says how to get it.
    """
    base = prompt.get("base_model")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if base:  # (after peft's save: it looks the name up to see whether the vocabulary changed)
            config = tmp / "adapter_config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": base},
                                         indent=2, sort_keys=True) + "\n")
            _add_base_model_note(tmp / "README.md", base)
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROMPT_FILE).write_text(json.dumps(prompt, indent=2, ensure_ascii=False))
        if config_yaml:
            (tmp / CONFIG_FILE).write_text(config_yaml)
        for name, text in (extra or {}).items():  # (e.g. calibration.json: part of the same atomic folder)
            (tmp / name).write_text(text)
    return Path(out_dir)


# How plain transformers gets each builtin: base model (the folder the command writes is the base to load)
BUILTIN_RECIPES = {"tiny-deepseek": "python -m finllm_pl.assets tiny --out tiny-deepseek"}


def _add_base_model_note(card: Path, base: str) -> None:
    """A section at the top of the adapter's model card: the base model and how to load the adapter on it."""
    if base.startswith("builtin:"):
        recipe = BUILTIN_RECIPES.get(base.split(":", 1)[1], "python -m finllm_pl.assets --help")
        where = (f"`{base}` is a model finllm_pl builds offline, not a hub id: `{recipe}` writes it to a folder; "
                 "load that folder as the base")
        folder = recipe.rsplit(" ", 1)[-1]
    else:
        where, folder = f"`{base}` (a hub id, or a folder as given when training)", base
    note = (f"\n## Base model\n\n{where}:\n\n```python\nfrom peft import PeftModel\nfrom transformers import "
            f"AutoModelForCausalLM\n\nbase = AutoModelForCausalLM.from_pretrained(\"{folder}\")\nmodel = "
            "PeftModel.from_pretrained(base, \"<this folder>\")\n```\n\nTrained on the base as prompt_format.json's "
            "`quantization` says (nf4: 4-bit NF4, double quantization); prompts exactly as prompt_format.json "
            "describes (finllm_pl's README: \"Use the adapter without finllm_pl\"). With finllm_pl: `python -m "
            "finllm_pl predict --config <cfg> --ckpt_path <this folder> --data.predict_path <file>`.\n")
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    head, sep, rest = text.partition("\n---\n") if text.startswith("---\n") else ("", "", text)
    head = re.sub(r"(?m)^(base_model: |- base_model:adapter:).*$", lambda m: m.group(1) + base, head)  # (peft: the path)
    card.write_text(head + sep + note + rest, encoding="utf-8")


def build(name: str, quantization: Quantization, compute_dtype: torch.dtype, device: torch.device,
          attn_implementation: Optional[str], trust_remote_code: bool, lora: dict[str, Any],
          adapter_path: Optional[str] = None, dequantize: bool = False, gradient_checkpointing: bool = False,
          seed: int = 0, quant_storage: Optional[torch.dtype] = None):
    """The PEFT model a run trains or labels with: the base (`dequantize`: its 4-bit layers held dequantized, the
    very values every 4-bit forward computes), then the adapter at `adapter_path` or a fresh LoRA (`lora`: r, alpha,
    dropout, target_modules, use_dora) whose random A's are drawn from `seed`. In train mode (from_pretrained returns
    eval mode, which would silently turn LoRA dropout off). quant_storage: see load_base_model."""
    base = load_base_model(name, quantization, compute_dtype, device, attn_implementation, trust_remote_code,
                           quant_storage)
    base.config.use_cache = False
    if dequantize and quantization != "none":
        base = base.dequantize()
    if adapter_path:
        model = load_adapter(base, adapter_path, trainable=True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        # seeded from the run's seed, not from whatever loading and tokenizing consumed before (which differs
        # between a first run and a cached one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = add_lora(base, lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"],
                             gradient_checkpointing, use_dora=lora.get("use_dora", False))
    return model.train()


def _why_not_loaded(path: str, e: Exception) -> str:
    """Why torch.load refused `path`, in one short phrase of whole words (torch's own texts run to several
    sentences, and differ by the byte the file ends on)."""
    text = " ".join(str(e).split())
    if os.path.getsize(path) == 0:
        return "the file is empty"
    if "Weights only load failed" in text:
        found = re.search(r"unsupported GLOBAL (\S+)", text)
        what = found.group(1) if found else "Python objects"
        return f"Weights only load failed: it holds {what}, which could run code when loaded; refused"
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format: a zip archive
    if zipped:
        return "not a complete checkpoint archive: cut short while saving or copying"
    first = re.split(r"(?<=[.!?]) ", text, maxsplit=1)[0] or type(e).__name__
    if len(first) > 100:
        first = first[:100].rsplit(" ", 1)[0] + "..."
    return f"not a file torch.save wrote: {type(e).__name__}: {first}"


def generate_answers(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy answers of left-padded prompts (every row's answer starts in the same column), up to EOS/pad, with
    their special tokens (a <think>...</think> block must stay visible for predict.parse_generated to drop it)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    texts = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=False))
    return texts


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint read with weights_only=True (no code runs), or a one-line ModelError."""
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such checkpoint file; check --ckpt_path (or use 'last')")
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or a pickle that would run code (refused by weights_only)
        why = _why_not_loaded(path, e)
        raise ModelError(
            f"{path}: checkpoint is corrupted or not a checkpoint ({why}); "
            "resume from another one (checkpoints/<run>/*.ckpt)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelError(f"{path}: not a Lightning checkpoint (no state_dict); give a .ckpt written by fit")
    return ckpt


def read_prompt_format(folder: str) -> Optional[dict]:
    path = Path(folder) / PROMPT_FILE
    return json.loads(path.read_text()) if path.exists() else None
