"""The architecture matrix: any Hugging Face causal LM must train and label right, on either backend.

Tiny random models of nine families, built from configs with the project's offline tokenizer (DeepSeek's special
tokens and chat template), each with what makes its family different: Llama (the reference shape), Qwen2 (q/k/v
biases), Qwen3 (q/k norms), Mistral (a sliding window shorter than the prompts), Gemma2 (attention and final logit
soft-capping, sliding windows on every other layer, scaled embeddings, eager attention), Gemma3 (sliding and full
layers, scaled embeddings, q/k norms), Phi-3 (fused qkv_proj and gate_up_proj), Granite (logits, embedding,
residual and attention multipliers) and Cohere (LayerNorm, parallel attention and MLP, logit_scale). For each:
  - the plain backend's training loss is Hugging Face's own loss, its label scores are brute-force
    log-probabilities (one full forward per row and label, no padding);
  - the self-check's decision: every fast component it keeps gives the plain backend's losses, LoRA gradients
    and label scores on real tokenized rows (fp32, rtol 1e-4 / 1e-3), every one it drops says why; and it keeps
    what is known to be right for the family (a component that steps aside where it need not is a regression);
  - fit -> resume -> predict -> export on the fast backend, then plain transformers + peft on the exported
    adapter, give the same labels and probabilities as predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finllm_pl import model as hf
from finllm_pl.__main__ import cli_main
from finllm_pl.backend import FastBackend, PlainBackend, RunShape, plan
from finllm_pl.backend.fast import closure
from finllm_pl.backend.plain import score_labels_plain
from finllm_pl.backend.static import StaticCollate
from finllm_pl.backend.tree import score_labels_reference
from finllm_pl.batching import collate_prompts, collate_train
from finllm_pl.export import main as export_main
from finllm_pl.prompts import DEFAULT_INSTRUCTION, PromptFormatter

ROOT = Path(__file__).resolve().parents[1]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# family -> (config changes, attention implementation, LoRA targets, fast components that must be kept on a CPU)
ALL_CPU = {"sparse_head", "label_tree", "prefix_reuse", "static_step", "lora_groups", "kernels"}
ARCHS = {
    "llama": ({}, "sdpa", QKVO, ALL_CPU),
    "qwen2": ({}, "sdpa", QKVO, ALL_CPU),
    "qwen3": ({}, "sdpa", QKVO, ALL_CPU),
    "mistral": ({"sliding_window": 16}, "sdpa", QKVO, ALL_CPU),
    # HF's sdpa refuses soft-capped attention, which the packed static step runs: it steps aside, saying so
    "gemma2": ({"sliding_window": 16, "query_pre_attn_scalar": 8}, "eager", QKVO, ALL_CPU - {"static_step"}),
    "gemma3_text": ({"sliding_window": 16, "query_pre_attn_scalar": 8,
                     "layer_types": ["sliding_attention", "full_attention"]}, "sdpa", QKVO, ALL_CPU),
    "phi3": ({}, "sdpa", ["qkv_proj", "o_proj"], ALL_CPU),
    "granite": ({"logits_scaling": 4.0, "embedding_multiplier": 6.0, "residual_multiplier": 0.5,
                 "attention_multiplier": 0.2}, "sdpa", QKVO, ALL_CPU),
    "cohere": ({"logit_scale": 0.5}, "sdpa", QKVO, ALL_CPU),
}
TEXTS = ["Shares fell 5% after the profit warning and the chief executive stepped down at once.",
         "Board meets Tuesday.", "Revenue rose to a record on strong demand in every region of the group.", "Up.",
         "The company kept its outlook for the year unchanged.", "Orders doubled in the quarter."]
LABELS = ["negative", "neutral", "positive", "neutral", "neutral", "positive"]


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    """A model folder per family: random weights (seeded), the tiny tokenizer, 2 layers of width 32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from finllm_pl.assets import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for arch, (extra, _, _, _) in ARCHS.items():
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=(len(tok) + 63) // 64 * 64, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.1, **({} if arch == "phi3" else {"head_dim": 8}), **extra)
        config = AutoConfig.for_model(arch, **kw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # norms at one hide a wrong norm
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(1, 0.3)
        out[arch] = root / arch
        model.save_pretrained(out[arch])
        tok.save_pretrained(out[arch])
    return out


def _lora_model(folder: Path, arch: str):
    _, attn, targets, _ = ARCHS[arch]
    base = hf.load_base_model(str(folder), "none", torch.float32, attn_implementation=attn)
    torch.manual_seed(1)
    model = hf.add_lora(base, 4, 8, 0.0, targets)
    with torch.no_grad():  # a non-zero adapter: the LoRA path counts in every comparison
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def _batches(folder: Path):
    """A training batch (plain and static fields) and a labeling batch of real tokenized rows: a shared
    template + instruction prefix, inputs long enough to cross the 16-token windows."""
    f = PromptFormatter(hf.load_tokenizer(str(folder)))
    rows = []
    for text, label in zip(TEXTS, LABELS):
        ids, labels, _, _ = f.encode_example(DEFAULT_INSTRUCTION, text, label, 256)
        rows.append({"input_ids": ids, "labels": labels})
    train = StaticCollate(f.tokenizer.pad_token_id, 8, len(rows))(rows)
    val = collate_train(rows, f.tokenizer.pad_token_id)
    val.update(collate_prompts([f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS], f.tokenizer.pad_token_id,
                               f.encode_labels(["negative", "neutral", "positive"])))
    assert max(len(r["input_ids"]) for r in rows) > 40 and len(val["prefix_ids"]) >= 8
    return train, val


def _run(backend, model, train, val) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    model.train()
    loss, n = backend.train_step(train, lambda t: t.backward(), lambda last: torch.enable_grad())
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    model.eval()
    with torch.no_grad(), backend.labeling():
        val_loss, val_n = backend.loss(val)
        scores = backend.score(val)
    return {"loss": loss / n, "grads": grads, "val_loss": val_loss / val_n, "scores": scores}


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_equals_hf_and_brute_force_and_every_kept_fast_component_equals_plain(arch_dirs, arch):
    folder = arch_dirs[arch]
    model = _lora_model(folder, arch)
    train, val = _batches(folder)
    plain = PlainBackend(model, torch.float32)
    with torch.no_grad():
        loss, n = plain.loss_sum(train["input_ids"], train["attention_mask"], train["labels"])
        hf_loss = model(input_ids=train["input_ids"], attention_mask=train["attention_mask"],
                        labels=train["labels"]).loss
        torch.testing.assert_close(loss / n, hf_loss, rtol=1e-5, atol=1e-6)  # HF's own loss
        args = (val["prompt_ids"], val["prompt_mask"], val["label_ids"], val["label_mask"])
        torch.testing.assert_close(score_labels_plain(model, *args), score_labels_reference(model, *args),
                                   rtol=1e-4, atol=2e-4)  # brute force: no padding, a forward per row and label

    _, attn, targets, must = ARCHS[arch]
    shape = RunShape(str(folder), "none", torch.float32, torch.device("cpu"), 4, 8, targets, attn, False, 256, True)
    decision = plan("fast", shape)
    assert must <= set(decision.on), decision.lines()
    assert all(why for why in decision.off.values())  # every component left out says why
    ref = _run(plain, model, train, val)
    for c in decision.on:  # each kept component alone (with what it needs), then all of them together
        got = _run(FastBackend(model, torch.float32, closure([c])), model, train, val)
        _assert_same(got, ref, c)
    _assert_same(_run(FastBackend(model, torch.float32, decision.on), model, train, val), ref, "all")


def _assert_same(got: dict, ref: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-4, atol=1e-6, msg=what)
    torch.testing.assert_close(got["val_loss"], ref["val_loss"], rtol=1e-4, atol=1e-6, msg=what)
    assert (got["grads"] - ref["grads"]).norm() <= 1e-3 * ref["grads"].norm(), what
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=1e-4, atol=1e-3, msg=what)


@pytest.mark.parametrize("arch", ARCHS)
def test_fit_resume_predict_export_then_plain_peft_label_alike(arch_dirs, arch, workdir):
    """The whole product on each family (fast backend, 4-bit base): fit one optimizer step, resume to two,
    label a file, export the adapter; plain transformers + peft on that adapter give predict's labels and
    probabilities."""
    folder = arch_dirs[arch]
    _, attn, targets, _ = ARCHS[arch]
    train = Path("train.jsonl")
    train.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(TEXTS * 2, LABELS * 2)))
    base = ["--config", "configs/smoke.yaml", "--model.model_name_or_path", str(folder), "--data.train_path",
            str(train), "--data.val_fraction", "0", "--data.batch_size", "4", "--model.accumulate_grad_batches", "1",
            "--model.lora_target_modules", json.dumps(targets), "--model.lr_decay", "constant",
            "--model.warmup_steps", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--checkpoint.dirpath", "ck", "--checkpoint.every_n_train_steps", "1"]
    if attn != "sdpa":
        base += ["--model.attn_implementation", attn]
    cli_main(["fit", *base, "--trainer.max_steps", "1"])
    cli = cli_main(["fit", *base, "--trainer.max_steps", "2", "--ckpt_path", "ck/last.ckpt"])
    assert cli.trainer.global_step == 2
    inp = Path("in.txt")
    inp.write_text("".join(t + "\n" for t in TEXTS))
    cli_main(["predict", *base, "--ckpt_path", "ck/adapter", "--data.predict_path", str(inp),
              "--data.predict_output", "out.jsonl"])
    rows = [json.loads(line) for line in open("out.jsonl")]
    assert len(rows) == len(TEXTS)
    assert export_main(["ck/last.ckpt", "--out", "exported"]) == 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base_model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quant, device_map={"": "cpu"},
                                                      dtype=torch.float32, attn_implementation=attn)
    for m in base_model.modules():  # (bitsandbytes 0.50's one-way CPU repack breaks tiny layers: off, as finllm_pl does)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base_model, "exported").eval()
    f = PromptFormatter(AutoTokenizer.from_pretrained("exported"))
    b = collate_prompts([f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS], f.tokenizer.pad_token_id,
                        f.encode_labels(["negative", "neutral", "positive"]))
    with torch.no_grad():
        probs = torch.softmax(score_labels_plain(model, b["prompt_ids"], b["prompt_mask"], b["label_ids"],
                                                 b["label_mask"]), -1)
    for row, p in zip(rows, probs.tolist()):
        assert row["label"] == ["negative", "neutral", "positive"][max(range(3), key=p.__getitem__)]
        assert max(abs(row["probs"][k] - v) for k, v in zip(("negative", "neutral", "positive"), p)) < 1e-4
