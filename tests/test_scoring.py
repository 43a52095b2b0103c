"""Label scoring (plain, and the fast backend's label tree with prefix reuse) and the losses (plain, sparse head)
against brute-force references on the tiny model."""

import pytest
import torch

from finllm_pl import model as hf
from finllm_pl.batching import collate_prompts, collate_train, shared_prefix_ids
from finllm_pl.prompts import DEFAULT_INSTRUCTION, PromptFormatter
from finllm_pl.backend.plain import PlainBackend, score_labels_plain
from finllm_pl.backend.tree import Head, common_prefix_length, score_labels_reference, score_labels_tree, sparse_loss_sum


def score_labels(model, *args, **kwargs):
    """The label tree (prefix reuse by default), as the fast backend scores."""
    return score_labels_tree(Head(model), *args, **kwargs)

TEXTS = ["Shares fell 5% after the profit warning.", "Board meets Tuesday.",
         "Revenue rose to a record on strong demand in every region.", "Up."]


def _lora_model(tiny_dir, quantization, attn="sdpa"):
    torch.manual_seed(0)
    base = hf.load_base_model(str(tiny_dir), quantization, torch.float32, attn_implementation=attn)
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
    args = (b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"])
    with torch.no_grad():
        fast = score_labels(model, *args)
        plain = score_labels_plain(model, *args)  # the plain backend: one HF forward per label, padded batch
    ref = score_labels_reference(model, *args)
    assert fast.shape == plain.shape == (len(TEXTS), len(labels))
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(plain, ref, atol=2e-4, rtol=1e-5)


class _DecoderCalls:
    """Records (batch, length) of every decoder forward: which path `score_labels` took."""

    def __init__(self, model):
        self.shapes = []
        decoder = Head(model).decoder
        self.handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _shared_prefix(prompts):
    """Reference for common_prefix_length: plain Python over the unpadded token lists."""
    n = 0
    while all(len(p) > n for p in prompts) and len({p[n] for p in prompts}) == 1:
        n += 1
    return min(n, min(map(len, prompts)) - 1)


def _scores_three_ways(model, prompts, label_ids, pad_id, min_prefix=8):
    b = collate_prompts(prompts, pad_id, label_ids)
    args = (b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"])
    with torch.no_grad(), _DecoderCalls(model) as calls:
        fast = score_labels(model, *args, min_prefix=min_prefix)
    with torch.no_grad():
        plain = score_labels(model, *args, min_prefix=0)
    ref = score_labels_reference(model, *args)
    return fast, plain, ref, calls.shapes, b


PREFIX_LABELS = [["negative", "neutral", "positive"], ["bearish", "no clear view on the stock", "positive"]]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("labels", PREFIX_LABELS)
def test_shared_prefix_scores_equal_plain_path_and_brute_force(tiny_dir, tiny_tokenizer, quantization, labels):
    model = _lora_model(tiny_dir, quantization)
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(labels)
    prompts = [f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding between the parts
    fast, plain, ref, shapes, b = _scores_three_ways(model, prompts, label_ids, tiny_tokenizer.pad_token_id)
    P = _shared_prefix(prompts)
    assert P >= 8 and common_prefix_length(b["prompt_ids"], b["prompt_mask"]) == P
    T = b["prompt_ids"].shape[1]
    B, K = len(prompts), len(labels)
    # prefix once at batch 1, then the suffixes with the label tree (K x (L-1) tokens) in the same pass; no pass
    # at batch B x K (the cache is never repeated per label)
    assert shapes == [(1, P), (B, T - P + K * (b["label_ids"].shape[1] - 1))]
    torch.testing.assert_close(fast, plain, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_partly_shared_prefix(tiny_dir, tiny_tokenizer, quantization):
    """Two instructions that agree only on their first words, and a prompt that is a prefix of another."""
    model = _lora_model(tiny_dir, quantization)
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(["bearish", "no clear view on the stock", "positive"])
    other = "What is the sentiment of this tweet? Answer with one word."
    prompts = [f.encode_prompt(DEFAULT_INSTRUCTION, TEXTS[0]), f.encode_prompt(other, TEXTS[1]),
               f.encode_prompt(other, TEXTS[2])]
    full_common = _shared_prefix([prompts[0], f.encode_prompt(DEFAULT_INSTRUCTION, TEXTS[1])])
    P = _shared_prefix(prompts)
    assert 8 <= P < full_common  # shared only partly: the instructions diverge
    fast, plain, ref, shapes, _ = _scores_three_ways(model, prompts, label_ids, tiny_tokenizer.pad_token_id)
    assert shapes[0] == (1, P)
    torch.testing.assert_close(fast, plain, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)

    # a whole prompt that is the start of another: the prefix stops one token short, so it keeps a token of its own
    long = prompts[0]
    short = long[: P + 3]
    fast, plain, ref, shapes, b = _scores_three_ways(model, [long, short], label_ids, tiny_tokenizer.pad_token_id)
    assert common_prefix_length(b["prompt_ids"], b["prompt_mask"]) == len(short) - 1
    assert shapes[0] == (1, len(short) - 1)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(plain, ref, atol=2e-4, rtol=1e-5)


def test_prefix_reuse_off_for_one_row_short_prefix_or_zero(tiny_dir, tiny_tokenizer):
    model = _lora_model(tiny_dir, "none")
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(["negative", "neutral", "positive"])
    pad = tiny_tokenizer.pad_token_id
    prompts = [f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS]
    T = max(map(len, prompts))
    # batch of 1: the plain path (one forward over prompt + label tree), same scores
    fast, plain, ref, shapes, b = _scores_three_ways(model, prompts[:1], label_ids, pad)
    assert shapes == [(1, len(prompts[0]) + 3 * (b["label_ids"].shape[1] - 1))]
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)
    # the threshold: a prefix shorter than min_prefix is not worth a separate forward
    P = _shared_prefix(prompts)
    for min_prefix, taken in ((P, True), (P + 1, False), (0, False)):
        fast, _, ref, shapes, _ = _scores_three_ways(model, prompts, label_ids, pad, min_prefix=min_prefix)
        tree = 3 * (max(map(len, label_ids)) - 1)  # label tree columns after the prompt
        assert (shapes[0] == (1, P)) is taken and (shapes[0] == (len(prompts), T + tree)) is not taken
        torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)
    # no common first token at all
    odd = [prompts[0], [t + 1 for t in prompts[1]]]
    b = collate_prompts(odd, pad, label_ids)
    assert common_prefix_length(b["prompt_ids"], b["prompt_mask"]) == 0


@pytest.mark.parametrize("min_prefix", [0, 8])
def test_eager_attention_takes_the_label_tree_mask_too(tiny_dir, tiny_tokenizer, min_prefix):
    """Eager attention wants an additive float mask, SDPA a boolean one: both give the brute-force scores."""
    model = _lora_model(tiny_dir, "nf4", attn="eager")
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(["bearish", "no clear view on the stock", "positive"])
    prompts = [f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS]
    fast, plain, ref, shapes, _ = _scores_three_ways(model, prompts, label_ids, tiny_tokenizer.pad_token_id,
                                                     min_prefix=min_prefix)
    assert len(shapes) == (2 if min_prefix else 1)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-5)


def test_common_prefix_length_on_left_padded_rows():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8],
                        [5, 6, 7, 9, 9, 9],
                        [pad, 5, 6, 7, 8, 1]])
    mask = (torch.arange(6)[None] >= torch.tensor([[2], [0], [1]])).long()
    assert common_prefix_length(ids, mask) == 3
    assert common_prefix_length(ids[:1], mask[:1]) == 3  # one row: all but its last token
    assert common_prefix_length(ids[[0, 2]], mask[[0, 2]]) == 3  # [5,6,7,8] vs [5,6,7,8,1]: capped at 4 - 1
    # the host's answer (collate_prompts), for the same rows
    rows = [[5, 6, 7, 8], [5, 6, 7, 9, 9, 9], [5, 6, 7, 8, 1]]
    assert shared_prefix_ids(rows) == (5, 6, 7)
    assert shared_prefix_ids(rows[:1]) == (5, 6, 7)
    assert shared_prefix_ids([rows[0], rows[2]]) == (5, 6, 7)
    assert shared_prefix_ids([[5, 6, 7, 8], [5, 6, 7, 8]]) == (5, 6, 7)
    assert shared_prefix_ids([[4, 6, 7], [5, 6, 7]]) == ()


def test_host_prefix_scores_like_the_device_prefix_without_reading_the_device(tiny_dir, tiny_tokenizer,
                                                                              monkeypatch):
    """collate_prompts' shared_prefix (found on the host) gives the scores the device search gives, and scoring
    with it and a memo reads nothing back from the device (no .tolist() / int() of a tensor: GPU syncs)."""
    model = _lora_model(tiny_dir, "nf4")
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(["negative", "neutral", "positive"])
    prompts = [f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS]
    b = collate_prompts(prompts, tiny_tokenizer.pad_token_id, label_ids)
    assert len(b["prefix_ids"]) == _shared_prefix(prompts) == common_prefix_length(b["prompt_ids"], b["prompt_mask"])
    assert list(b["prefix_ids"]) == prompts[0][:len(b["prefix_ids"])]
    args = (b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"])
    memo = {}
    with torch.no_grad():
        device = score_labels(model, *args)
        host = score_labels(model, *args, prefix_memo=memo, prefix=list(b["prefix_ids"]))  # (pinning makes lists)
        assert list(memo) == [b["prefix_ids"]]
        reads = []
        for name in ("tolist", "item", "__int__", "__bool__"):
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: (reads.append(_n), _o(self, *a))[1])
        score_labels(model, *args, prefix_memo={})
        assert reads  # the device search reads back (so the check below can fail)
        reads.clear()
        again = score_labels(model, *args, prefix_memo=memo, prefix=b["prefix_ids"])
        monkeypatch.undo()
        assert reads == []
    torch.testing.assert_close(host, device, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, device, atol=1e-5, rtol=1e-5)


def test_sparse_head_and_plain_losses_equal_hf_s_loss(tiny_dir, tiny_tokenizer):
    model = _lora_model(tiny_dir, "none")
    f = PromptFormatter(tiny_tokenizer)
    rows = []
    for t, lab in zip(TEXTS, ["negative", "neutral", "positive", "neutral"]):
        ids, labels, _, _ = f.encode_example(DEFAULT_INSTRUCTION, t, lab, 128)
        rows.append({"input_ids": ids, "labels": labels})
    b = collate_train(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        total, n = sparse_loss_sum(Head(model), b["input_ids"], b["attention_mask"], b["labels"])
        plain, plain_n = PlainBackend(model, torch.float32).loss_sum(b["input_ids"], b["attention_mask"], b["labels"])
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    supervised = sum(len(f.encode_answer(lab)) for lab in ["negative", "neutral", "positive", "neutral"])
    assert n.item() == plain_n.item() == supervised
    torch.testing.assert_close(total / n, ref, atol=1e-5, rtol=1e-5)  # HF's own mean loss
    torch.testing.assert_close(plain / n, ref, atol=1e-5, rtol=1e-5)


def test_prefix_memo_skips_the_prefix_forward_and_keeps_scores(tiny_dir, tiny_tokenizer):
    """A second batch with the same instruction reuses the remembered prefix cache: no batch-1 forward, same
    scores as without the memo; a different prefix gets its own entry."""
    model = _lora_model(tiny_dir, "nf4")
    f = PromptFormatter(tiny_tokenizer)
    label_ids = f.encode_labels(["negative", "neutral", "positive"])
    pad = tiny_tokenizer.pad_token_id
    memo = {}
    first = collate_prompts([f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS[:2]], pad, label_ids)
    second = collate_prompts([f.encode_prompt(DEFAULT_INSTRUCTION, t) for t in TEXTS[2:]], pad, label_ids)
    args = lambda b: (b["prompt_ids"], b["prompt_mask"], b["label_ids"], b["label_mask"])  # noqa: E731
    with torch.no_grad():
        with _DecoderCalls(model) as calls:
            a = score_labels(model, *args(first), prefix_memo=memo)
            b = score_labels(model, *args(second), prefix_memo=memo)
        assert len(memo) == 1
        assert [s[0] for s in calls.shapes] == [1, 2, 2]  # the prefix ran once, for the first batch only
        torch.testing.assert_close(a, score_labels(model, *args(first)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, score_labels(model, *args(second)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, score_labels_reference(model, *args(second)), atol=2e-4, rtol=1e-5)
        other = collate_prompts([f.encode_prompt("Is this good news? Answer in one word.", t) for t in TEXTS[:2]],
                                pad, label_ids)
        score_labels(model, *args(other), prefix_memo=memo)
        assert len(memo) == 2
