"""backend/selfcheck.py: a fast component that differs from the plain path, or raises, on the run's architecture is
switched off with its reason, and one that computes what plain computes stays on, in fp32 and in bf16."""

import pytest
import torch

from finllm_pl.backend import FastBackend, RunShape, plan
from finllm_pl.backend import lora, selfcheck

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _shape(tiny_dir, dtype=torch.float32, quantization="none", training=True):
    return RunShape(str(tiny_dir), quantization, dtype, torch.device("cpu"), 4, 8, QKVO, None, False, 128, training)


def test_every_component_proves_itself_on_the_tiny_model(tiny_dir):
    d = plan("fast", _shape(tiny_dir, quantization="nf4"))
    assert d.on == ["dequantize", "sparse_head", "label_tree", "prefix_reuse", "static_step", "lora_groups", "kernels"]
    assert d.off == {"cuda_graphs": "no CUDA device", "folded_attention": "no CUDA device"}
    assert d.lines()[0].startswith("model.backend fast: dequantize, sparse_head, label_tree")
    assert "model.backend fast: cuda_graphs switched off for this run: no CUDA device" in d.lines()


def test_in_bf16_the_tolerance_follows_the_plain_path_s_own_rounding(tiny_dir, monkeypatch):
    """bf16: every component is within 3x the plain path's distance from the fp32 result (no false alarm from
    rounding), and a component off by far more than rounding is still caught."""
    d = plan("fast", _shape(tiny_dir, torch.bfloat16))
    assert {"sparse_head", "label_tree", "prefix_reuse", "static_step", "lora_groups", "kernels"} <= set(d.on)
    score = FastBackend.score
    monkeypatch.setattr(FastBackend, "score", lambda self, b: score(self, b) + 0.3 * self.on["label_tree"])
    d = plan("fast", _shape(tiny_dir, torch.bfloat16))
    assert d.off["label_tree"].startswith("its label scores differ from the plain path's by 0.3")
    assert d.off["prefix_reuse"] == "it needs label_tree" and "sparse_head" in d.on


def test_a_component_that_differs_is_switched_off_with_its_reason(tiny_dir, monkeypatch):
    score = FastBackend.score
    monkeypatch.setattr(FastBackend, "score", lambda self, b: score(self, b) + 0.01 * self.on["prefix_reuse"])
    d = plan("fast", _shape(tiny_dir))
    assert "label_tree" in d.on and "prefix_reuse" not in d.on
    assert d.off["prefix_reuse"] == "its label scores differ from the plain path's by 0.01"


def test_a_component_that_raises_is_switched_off_and_the_others_stay(tiny_dir, monkeypatch):
    def boom(self, x, *a, **k):
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(lora.LoRAGroup, "_first", boom)
    d = plan("fast", _shape(tiny_dir))
    assert d.off["lora_groups"] == "it raised RuntimeError: no such kernel here"
    assert {"sparse_head", "label_tree", "static_step", "kernels"} <= set(d.on)


def test_components_that_differ_only_together_are_all_switched_off(tiny_dir, monkeypatch):
    loss_sum = FastBackend.loss_sum

    def together(self, *a):  # wrong only when both of these run
        loss, n = loss_sum(self, *a)
        return loss * (1.5 if self.on["kernels"] and self.on["lora_groups"] else 1.0), n

    monkeypatch.setattr(FastBackend, "loss_sum", together)
    d = plan("fast", _shape(tiny_dir, training=False))
    assert d.on == []
    assert d.off["kernels"].startswith("together with the others, its validation loss differs")


def test_the_run_s_setup_rules_out_what_cannot_work_before_any_check(tiny_dir):
    def off(**kw):
        return plan("fast", _shape(tiny_dir, training=kw.pop("training", True)), **kw).off

    assert off(world_size=2)["static_step"].startswith("the run has several processes")
    assert off(precision="16-mixed")["cuda_graphs"] == "fp16 loss scaling is on (use bf16-mixed)"
    assert off(gradient_checkpointing=True)["static_step"] == "gradient checkpointing is on"
    assert off(training=False)["static_step"] == "it trains, and this run does not"
    assert off(skip=["kernels"])["kernels"] == "model.fast_skip names it"
    assert plan("plain", _shape(tiny_dir)).on == []


def test_every_rank_keeps_only_what_every_rank_kept(tiny_dir):
    """DDP: a component kept on this rank but not on another is off here too (asked in a fixed order, so every
    rank takes part in every vote)."""
    asked = []

    def agree(on):  # another rank said no to the 3rd component asked about (label_tree)
        asked.append(on)
        return on and len(asked) != 3

    d = plan("fast", _shape(tiny_dir), world_size=2, agree=agree)
    assert len(asked) == len(selfcheck.COMPONENTS)
    assert "label_tree" not in d.on and d.off["label_tree"] == "it differed from the plain path on another rank"


def test_the_stand_in_keeps_one_layer_of_each_kind_and_a_small_vocabulary(tmp_path):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262_144, num_hidden_layers=26, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=512,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.save_pretrained(tmp_path)
    small = selfcheck.stand_in_config(str(tmp_path), False)
    assert small.layer_types == ["sliding_attention", "full_attention"] and small.num_hidden_layers == 2
    assert small.vocab_size == selfcheck.CHECK_VOCAB and small.hidden_size == 64 and small.sliding_window == 512


@pytest.mark.parametrize("window, longest", [(None, 40), (16, 40), (600, 40)])
def test_the_made_up_rows_cross_a_window_shorter_than_the_run_s_rows(tiny_dir, window, longest):
    config = selfcheck.stand_in_config(str(tiny_dir), False)
    config.sliding_window, config.layer_types = window, ["sliding_attention"] if window else ["full_attention"]
    train, val = selfcheck.batches(config, _shape(tiny_dir), torch.device("cpu"))
    assert int(train["attention_mask"].sum(1).max()) == longest and (window is None or window >= 128 or
                                                                     longest > window)
