"""`python -m finllm_pl export SOURCE --out DIR [--merged [--quantize nf4]]`: deployable folders from a run.

SOURCE is the adapter folder `fit` exported (checkpoints/<run>/adapter) or any `.ckpt` that fit wrote (the
checkpoint carries the model and data settings, so no config is needed). Two outputs:

  - adapter (default): the PEFT folder alone, adapter_model.safetensors + tokenizer + prompt format. Serve it on
    the 4-bit or the full base (peft, vLLM's LoRA support); `predict --ckpt_path DIR` takes it.
  - merged (--merged): a plain transformers model folder, the LoRA folded into the base weights, safetensors in
    --dtype (bf16 by default), with the tokenizer and prompt format; loads without peft or bitsandbytes, and
    `predict --ckpt_path DIR` takes it too (labeled as it is: unquantized, unless --model.quantization is given).
  - merged 4-bit (--merged --quantize nf4): the same, its linear layers then saved 4-bit by bitsandbytes with their
    quantization config: `AutoModelForCausalLM.from_pretrained(DIR)` loads it 4-bit, and so does predict. The
    LoRA update is rounded to NF4 with the weights: labels as the adapter on the 4-bit base, approximately.

Which base weights the LoRA is folded into (--merge-into): `trained` (default) is the base as training saw it:
for a QLoRA run, the NF4 weights dequantized, so the merged model computes exactly what the adapter on the
4-bit base computes. `original` folds into the unquantized checkpoint instead (the usual peft recipe, a slightly
different function from the one that was trained: the quantization error is gone).

No Lightning here: checkpoints are read with torch.load(weights_only=True) and the rest is transformers + peft.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from . import model as hf
from .calibration import FILENAME as CALIBRATION_FILE
from .errors import FinLLMError, ModelError
from .files import atomic_dir
from .prompts import PromptFormatter


def prompt_record(formatter: PromptFormatter, data_hp: dict[str, Any], model_hp: dict[str, Any]) -> dict[str, Any]:
    """What an exported folder carries so labeling formats prompts exactly as training did."""
    return {**formatter.describe(), "labels": list(data_hp["labels"]), "instruction": data_hp["instruction"],
            "max_length": data_hp["max_length"], "base_model": model_hp["model_name_or_path"],
            "quantization": model_hp["quantization"]}


def _read_ckpt(path: str) -> dict[str, Any]:
    ckpt = hf.load_checkpoint_file(path)
    if "finllm" not in ckpt or "hyper_parameters" not in ckpt:
        raise ModelError(f"{path}: not a finllm_pl checkpoint; give a .ckpt that `fit` wrote or an adapter folder")
    return ckpt


def adapter_from_checkpoint(ckpt_path: str, out_dir: str) -> Path:
    """The adapter folder of a fit checkpoint: LoRA weights + tokenizer + prompt format, as fit's export writes."""
    ckpt = _read_ckpt(ckpt_path)
    mhp, dhp = ckpt["hyper_parameters"], ckpt.get("datamodule_hyper_parameters")
    if not dhp:
        raise ModelError(f"{ckpt_path}: checkpoint has no data settings (datamodule_hyper_parameters); export the "
                         "adapter folder fit wrote instead")
    # The LoRA tensors only need a module tree to sit in: an unquantized fp32 base on CPU is the simplest host.
    base = hf.load_base_model(mhp["model_name_or_path"], "none", torch.float32,
                              trust_remote_code=mhp["trust_remote_code"])
    peft_model = hf.add_lora(base, mhp["lora_r"], mhp["lora_alpha"], mhp["lora_dropout"],
                             mhp["lora_target_modules"], gradient_checkpointing=False,
                             use_dora=mhp.get("use_dora", False))  # absent from checkpoints older than the option
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing = {n for n, p in peft_model.named_parameters() if p.requires_grad} - set(state)
    if missing or len(state) != len(ckpt["state_dict"]):
        raise ModelError(f"{ckpt_path}: checkpoint tensors do not match its own LoRA settings ({len(missing)} missing)")
    peft_model.load_state_dict(state, strict=False)
    tok = hf.load_tokenizer(dhp["tokenizer"], mhp["trust_remote_code"])
    formatter = PromptFormatter(tok, dhp["prompt_style"], dhp["think"], dhp["system_prompt"])
    return hf.export_adapter(peft_model, tok, out_dir, prompt_record(formatter, dhp, mhp))


def merged_from_adapter(adapter_dir: str, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                        merge_into: str = "trained", base: Optional[str] = None,
                        trust_remote_code: bool = False, quantize: str = "none") -> Path:
    """A plain transformers folder: base weights (as trained, or original) + the LoRA update, in `dtype`; with
    `quantize` (nf4 / fp4) the merged linear layers saved 4-bit by bitsandbytes (double quantization, compute dtype
    `dtype`) with their quantization config, so `AutoModelForCausalLM.from_pretrained(out_dir)` loads them 4-bit."""
    prompt = hf.read_prompt_format(adapter_dir) or {}
    base = base or prompt.get("base_model") or _adapter_base(adapter_dir)
    quant = prompt.get("quantization", "none") if merge_into == "trained" else "none"
    # Merge in fp32 whatever the output dtype: W + B@A rounded once, at the end.
    model = hf.load_base_model(base, quant, torch.float32, trust_remote_code=trust_remote_code)
    if quant != "none":
        model = model.dequantize()  # the exact NF4/FP4 values training used, as fp32 nn.Linear weights
    merged = hf.load_adapter(model, adapter_dir).merge_and_unload()
    tok = hf.load_tokenizer(adapter_dir if os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json")) else base,
                            trust_remote_code)
    with atomic_dir(out_dir) as tmp:
        if quantize == "none":
            merged.to(dtype)
            merged.config.dtype = dtype
            merged.save_pretrained(str(tmp), safe_serialization=True)
        else:
            _save_4bit(merged, tmp, quantize, dtype, trust_remote_code)
        tok.save_pretrained(str(tmp))
        # calibration.json scales label scores, which the merged model computes as the adapter did
        for extra in (hf.PROMPT_FILE, hf.CONFIG_FILE, CALIBRATION_FILE):
            if (Path(adapter_dir) / extra).exists():
                shutil.copy(Path(adapter_dir) / extra, tmp / extra)
    return Path(out_dir)


def _save_4bit(merged, out: Path, quantize: str, dtype: torch.dtype, trust_remote_code: bool) -> None:
    """The fp32 merged model quantized by bitsandbytes as a 4-bit load does (blockwise absmax, NF4/FP4 codes, double
    quantization), on the CPU (the same bits on any machine), and saved with its quantization config. The LoRA
    update is rounded with the weights: see the README's export line for what that costs."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fp32-") as plain:
        merged.save_pretrained(plain, safe_serialization=True)
        model = hf.load_base_model(plain, quantize, dtype, torch.device("cpu"), trust_remote_code=trust_remote_code)
        model.config.dtype = dtype
        model.save_pretrained(str(out), safe_serialization=True)


def _adapter_base(adapter_dir: str) -> str:
    import json

    cfg = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    return cfg["base_model_name_or_path"]


def export(source: str, out: str, merged: bool = False, dtype: str = "bfloat16", merge_into: str = "trained",
           base: Optional[str] = None, trust_remote_code: bool = False, quantize: str = "none") -> Path:
    src = Path(source)
    if Path(out).resolve() == src.resolve():
        raise ModelError(f"--out {out} is the source itself; choose another folder")
    if quantize != "none" and not merged:
        raise ModelError(f"--quantize {quantize} quantizes a merged model: add --merged (an adapter is the LoRA alone; "
                         "serve it on the 4-bit base)")
    if src.is_dir():
        if not (src / "adapter_config.json").exists():
            raise ModelError(f"{source}: folder is not an adapter (no adapter_config.json); give the folder fit "
                             "exported (checkpoints/<run>/adapter) or a .ckpt")
        adapter = str(src)
        if not merged:
            with atomic_dir(out) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            return Path(out)
    elif src.is_file():
        if not merged:
            return adapter_from_checkpoint(str(src), out)
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            adapter = str(adapter_from_checkpoint(str(src), os.path.join(td, "adapter")))
            return merged_from_adapter(adapter, out, getattr(torch, dtype), merge_into, base, trust_remote_code,
                                       quantize)
    else:
        raise ModelError(f"{source}: no such checkpoint file or adapter folder")
    return merged_from_adapter(adapter, out, getattr(torch, dtype), merge_into, base, trust_remote_code, quantize)


def main(argv: Optional[list[str]] = None, prog: str = "python -m finllm_pl export") -> int:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="adapter folder (checkpoints/<run>/adapter) or a .ckpt written by fit")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--merged", action="store_true", help="fold the LoRA into the base: a plain transformers model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights dtype of the merged model (with --quantize: of its unquantized parts and the 4-bit "
                        "layers' compute dtype)")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4"],
                   help="with --merged: save the merged linear layers 4-bit (bitsandbytes, double quantization); plain "
                        "AutoModelForCausalLM.from_pretrained(DIR) loads them 4-bit")
    p.add_argument("--merge-into", default="trained", choices=["trained", "original"],
                   help="trained: the base as training saw it (NF4 dequantized for QLoRA); original: unquantized base")
    p.add_argument("--base", help="base model to merge into (default: the one recorded beside the adapter)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model folder")
    a = p.parse_args(argv)
    try:
        out = export(a.source, a.out, a.merged, a.dtype, a.merge_into, a.base, a.trust_remote_code, a.quantize)
    except FinLLMError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    what = f"merged model ({a.quantize}, 4-bit)" if a.merged and a.quantize != "none" else \
        "merged model" if a.merged else "adapter"
    print(f"{what} written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
