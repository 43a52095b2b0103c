"""Label scoring and the sparse-head loss against brute-force references on the tiny model."""

import pytest
import torch

from finllm_pl import model as hf
from finllm_pl.data import collate_prompts, collate_train
from finllm_pl.prompts import DEFAULT_INSTRUCTION, PromptFormatter
from finllm_pl.scoring import loss_sum, score_labels, score_labels_reference

TEXTS = ["Shares fell 5% after the profit warning.", "Board meets Tuesday.",
         "Revenue rose to a record on strong demand in every region.", "Up."]


def _lora_model(tiny_dir, quantization):
    torch.manual_seed(0)
    base = hf.load_base_model(str(tiny_dir), quantization, torch.float32)
    model = hf.add_lora(base, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # a non-zero adapter, so the test covers the LoRA path too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("labels", [["negative", "neutral", "positive"],
                                    ["bearish", "no clear view on the stock", "positive"]])
def test_label_scores_equal_brute_force(tiny_dir, tiny_tokenizer, quantization, labels):
    model = _lora_model(tiny_dir, quantization)
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(labels)
    assert len({len(s) for s in label_ids}) > 1  # labels of different token lengths (multi-token, padded)
    b = collate_prompts([f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS], tiny_tokenizer.pad_token_id,
                        label_ids)
    with torch.no_grad():
        fast = score_labels(model, b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"])
    ref = score_labels_reference(model, b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"])
    assert fast.shape == (len(TEXTS), len(labels))
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)


def test_sparse_head_loss_equals_full_vocabulary_loss(tiny_dir, tiny_tokenizer):
    model = _lora_model(tiny_dir, "none")
    f = PromptFormatter(tiny_tokenizer)
    rows = []
    for t, lab in zip(TEXTS, ["negative", "neutral", "positive", "neutral"]):
        ids, labels, _, _ = f.encode_example(DEFAULT_INSTRUCTION, t, lab, 128)
        rows.append({"input_ids": ids, "labels": labels})
    b = collate_train(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        total, n = loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    supervised = sum(len(f.encode_answer(lab)) for lab in ["negative", "neutral", "positive", "neutral"])
    assert n.item() == supervised
    torch.testing.assert_close(total / n, ref, atol=1e-5, rtol=1e-5)
