"""Prompt formats, masking and the DeepSeek-R1-Distill template behaviours, on the tiny offline tokenizer."""

import pytest
import torch

from finllm_pl.batching import collate_train
from finllm_pl.prompts import DEFAULT_INSTRUCTION, EMPTY_THINK, PromptFormatter

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def test_chat_prompt_has_bos_once_no_system_and_closed_empty_think(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer)  # auto -> chat template, think -> empty (vocab has </think>)
    assert (f.style, f.think) == ("chat", "empty")
    text = f.render("Classify.", "Shares fell.")
    assert text == f"{BOS}<｜User｜>Classify.\nShares fell.<｜Assistant｜>{EMPTY_THINK}"
    ids = f.encode_prompt("Classify.", "Shares fell.")
    bos = tiny_tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    # The pitfall this avoids: the rendered text already holds BOS and the tokenizer adds another.
    assert tiny_tokenizer(text)["input_ids"][:2] == [bos, bos]


def test_think_none_removes_the_think_tags(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer, think="none")
    text = f.render("Classify.", "Shares fell.")
    assert "<think>" not in text and text.endswith("<｜Assistant｜>")


def test_system_prompt_only_when_configured(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer, system_prompt="You are a analyst.")
    assert f.render("Q", "x").startswith(f"{BOS}You are a analyst.<｜User｜>")


def test_plain_format_is_fingpt_style_and_adds_bos_once(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer, style="plain")
    assert f.render("Classify.", "Shares fell.") == "Instruction: Classify.\nInput: Shares fell.\nAnswer: "
    ids = f.encode_prompt("Classify.", "Shares fell.")
    assert ids.count(tiny_tokenizer.bos_token_id) == 1


def test_labels_mask_prompt_only_and_eos_keeps_its_label_when_pad_is_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id  # DeepSeek's case
    f = PromptFormatter(tiny_tokenizer)
    ids, labels, plen, cut = f.encode_example(DEFAULT_INSTRUCTION, "Profit rose 5%.", "positive", 256)
    answer = tiny_tokenizer("positive", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert not cut
    assert ids == f.encode_prompt(DEFAULT_INSTRUCTION, "Profit rose 5%.") + answer
    assert labels == [-100] * plen + answer
    short = f.encode_example(DEFAULT_INSTRUCTION, "Up.", "neutral", 256)
    batch = collate_train([
        {"input_ids": ids, "labels": labels}, {"input_ids": short[0], "labels": short[1]}], tiny_tokenizer.pad_token_id)
    # Row 2 is padded with pad == eos: padding gets -100, but its real EOS (end of answer) keeps its label.
    row = batch["labels"][1]
    n = len(short[0])
    assert row[n - 1].item() == tiny_tokenizer.eos_token_id
    assert (row[n:] == -100).all() and (batch["input_ids"][1, n:] == tiny_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].sum().item() == n
    assert torch.equal(batch["labels"][0], torch.tensor(labels))


def test_truncation_cuts_the_input_never_the_answer(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer)
    text = " ".join(["Revenue rose while costs fell in the quarter."] * 40)
    ids, labels, plen, cut = f.encode_example(DEFAULT_INSTRUCTION, text, "neutral", 64)
    answer = f.encode_answer("neutral")
    assert cut and len(ids) <= 64
    assert ids[-len(answer):] == answer and labels[-len(answer):] == answer
    prompt = tiny_tokenizer.decode(ids[:plen])
    assert prompt.startswith(f"{BOS}<｜User｜>{DEFAULT_INSTRUCTION}\nRevenue rose")  # instruction kept whole
    assert prompt.endswith(f"<｜Assistant｜>{EMPTY_THINK}")  # template kept whole


def test_truncation_impossible_names_the_key(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer)
    with pytest.raises(ValueError, match="data.max_length"):
        f.encode_example(DEFAULT_INSTRUCTION, "x", "neutral", 8)


def test_label_sequences_end_with_eos_and_are_distinct(tiny_tokenizer):
    f = PromptFormatter(tiny_tokenizer)
    seqs = f.encode_labels(["negative", "neutral", "positive"])
    assert all(s[-1] == tiny_tokenizer.eos_token_id for s in seqs)
    with pytest.raises(ValueError, match="distinct"):
        f.encode_labels(["up", "up"])


def test_fingerprint_changes_with_prompt_format(tiny_tokenizer):
    a = PromptFormatter(tiny_tokenizer).fingerprint()
    assert a == PromptFormatter(tiny_tokenizer).fingerprint()
    assert a != PromptFormatter(tiny_tokenizer, think="none").fingerprint()
    assert a != PromptFormatter(tiny_tokenizer, style="plain").fingerprint()


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_batched_prompt_encoding_equals_the_per_row_one(tiny_tokenizer, style):
    f = PromptFormatter(tiny_tokenizer, style=style)
    rows = [(DEFAULT_INSTRUCTION, "Profit rose 5 %."), (DEFAULT_INSTRUCTION, ""), ("Label this.", "Shares fell."),
            (DEFAULT_INSTRUCTION, "Revenue " * 200)]  # the last one must be cut to fit
    for max_length in (512, 96):
        want = [f.encode_example(i, x, "negative", max_length) for i, x in rows]
        assert want[-1][3] or max_length == 512  # the long row really was truncated at 96
        assert f.encode_prompts(rows, "negative", max_length) == [ids[:plen] for ids, _, plen, _ in want]
