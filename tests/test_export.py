"""Adapters and exported models outside the project (issue 26.7-26.9): what an adapter records about its base, the
README's plain transformers + peft labeling recipe, and 4-bit merged exports."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from finllm_pl.__main__ import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jsonl"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    """12 texts to label."""
    path = tmp_path_factory.mktemp("news") / "news.txt"
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:12]]
    path.write_text("".join(r["input"].replace("\n", " ") + "\n" for r in rows))
    return path


def _predict(inp, out, *extra, ckpt=None):
    args = ["predict", "--config", str(ROOT / "configs/smoke.yaml"), "--data.predict_path", str(inp),
            "--data.predict_output", str(out), *QUIET, *extra]
    if ckpt:
        args += ["--ckpt_path", str(ckpt)]
    cli_main(args)
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def _export(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main(["export", *map(str, args)])
    return e.value.code


# -- 7. what an adapter records about its base model ----------------------------------------------------------------
def test_an_adapter_records_the_base_model_as_the_user_gave_it(trained, tmp_path, news):
    """builtin:tiny-deepseek, not the cache path it was built in (another machine has another cache); the folder's
    model card says how plain peft gets that base; finllm_pl loads the adapter back (predict, export)."""
    _, adapter, last = trained
    assert _export(last, "--out", tmp_path / "from_ckpt") == 0
    for folder in (adapter, tmp_path / "from_ckpt"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "builtin:tiny-deepseek", folder
        card = (folder / "README.md").read_text()
        assert "base_model: builtin:tiny-deepseek" in card and ".cache" not in card and "/tmp/" not in card
        assert "python -m finllm_pl.assets tiny --out" in card and "PeftModel.from_pretrained" in card
    rows = _predict(news, tmp_path / "labels.jsonl", ckpt=adapter)
    assert len(rows) == 12 and all(r["label"] in ("negative", "neutral", "positive") for r in rows)
    assert _export(adapter, "--out", tmp_path / "merged", "--merged") == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()


# -- 8. the README's recipe: label with the adapter using plain transformers + peft ---------------------------------
def _readme_recipe() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use the adapter without finllm_pl", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_recipe_labels_like_predict(trained, news, tmp_path, tiny_dir):
    """The README's ~20 lines (base + PeftModel, the prompt from prompt_format.json and the chat template with the
    think block, log P(label + EOS | prompt), softmax over the labels) give predict's labels and probabilities."""
    _, adapter, _ = trained
    code = _readme_recipe()
    assert len([line for line in code.splitlines() if line.strip()]) <= 34, code  # (imports, 4 settings, calibration)
    for name, value in (("ADAPTER", repr(str(adapter))), ("BASE", repr(str(tiny_dir))), ("DTYPE", "torch.float32"),
                        ("TEXTS", "[]")):
        code, n = re.subn(rf"(?m)^{name} = .*$", f"{name} = {value}", code)
        assert n == 1, name
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # bitsandbytes on a CPU with AVX512-BF16 runs its 4-bit matmuls in bf16 (predict turns that off on CPUs, as
    # model.load_base_model says); off here too, so the comparison is of the recipe, not of bf16 rounding
    for module in namespace["model"].modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    want = _predict(news, tmp_path / "labels.jsonl", ckpt=adapter)
    got = [namespace["label"](text) for text in news.read_text().splitlines()]
    assert [g[0] for g in got] == [w["label"] for w in want]
    diff = max(abs(g[1][k] - w["probs"][k]) for g, w in zip(got, want) for k in w["probs"])
    assert diff < 1e-4, diff


# -- 9. merged exports: 4-bit, and each labels as itself --------------------------------------------------------------
# How far a 4-bit merged model may label from the adapter on the 4-bit base, in probability. Re-quantizing the merged
# weights W = dequant(NF4(W0)) + BA rounds every weight of every adapted layer to NF4 again (16 levels per block of
# 64, scaled by the block's new absmax): a LoRA update smaller than half a level is rounded away, a larger one moves
# a weight by whole levels. The result is exactly the fp32 merged model quantized at load (asserted below), so the
# difference is NF4's rounding of the merged weights and nothing else: the same kind of error QLoRA's base already
# has. On this tiny random model (weights drawn at 0.1, an adapter trained at lr 1e-2 on every linear layer) it
# moves probabilities by up to 0.114 (median 0.047) on these 60 rows, where the base's own NF4 rounding moves them
# by 0.025; 0.15 is that measurement with room. A label may then change only where the adapter's top two
# probabilities are within 2 x 0.15 of each other.
REQUANTIZED = 0.15


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """(folder of 60 rows to label, the fp32 merged export, the 4-bit NF4 merged export)."""
    _, adapter, _ = trained
    tmp = tmp_path_factory.mktemp("merged")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:60]]
    (tmp / "in.txt").write_text("".join(r["input"].replace("\n", " ") + "\n" for r in rows))
    assert _export(adapter, "--out", tmp / "m32", "--merged", "--dtype", "float32") == 0
    assert _export(adapter, "--out", tmp / "m4", "--merged", "--quantize", "nf4", "--dtype", "float32") == 0
    return tmp, tmp / "m32", tmp / "m4"


def _max_diff(a, b) -> float:
    return max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(a, b) for k in x["probs"])


def test_a_4bit_merged_export_loads_4bit_with_plain_transformers_and_labels_like_the_adapter(trained, merged):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    _, adapter, _ = trained
    tmp, m32, m4 = merged
    q = json.loads((m4 / "config.json").read_text())["quantization_config"]
    assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    plain = AutoModelForCausalLM.from_pretrained(str(m4))  # no arguments: 4-bit from its own config
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert (m4 / "model.safetensors").stat().st_size < 0.8 * (m32 / "model.safetensors").stat().st_size

    inp = tmp / "in.txt"
    with_adapter = _predict(inp, tmp / "adapter.jsonl", ckpt=adapter)
    four_bit = _predict(inp, tmp / "m4.jsonl", ckpt=m4)  # (the config's model.quantization is nf4: not applied twice)
    # exactly the fp32 merged weights rounded to NF4: what quantizing the merged model at load gives
    at_load = _predict(inp, tmp / "m32_nf4.jsonl", "--model.quantization", "nf4", ckpt=m32)
    assert _max_diff(four_bit, at_load) < 1e-6
    assert _max_diff(with_adapter, four_bit) <= REQUANTIZED
    for a, b in zip(with_adapter, four_bit):
        top = sorted(a["probs"].values())
        if top[-1] - top[-2] > 2 * REQUANTIZED:
            assert a["label"] == b["label"], (a, b)


def test_a_merged_folder_labels_as_itself(trained, merged, capsys):
    """The config's model.quantization (nf4: the training run's, for its base) does not quantize a merged folder
    again: an unquantized one labels unquantized (= the adapter on the 4-bit base, whose dequantized weights it
    holds), a 4-bit one as saved; a quantization asked on the command line is applied, or refused for a 4-bit one."""
    _, adapter, _ = trained
    tmp, m32, m4 = merged
    inp = tmp / "in.txt"
    with_adapter = _predict(inp, tmp / "adapter2.jsonl", ckpt=adapter)
    as_is = _predict(inp, tmp / "m32.jsonl", ckpt=m32)
    assert _max_diff(as_is, _predict(inp, tmp / "m32_none.jsonl", "--model.quantization", "none", ckpt=m32)) == 0
    assert _max_diff(as_is, with_adapter) < 1e-4 and [r["label"] for r in as_is] == [r["label"] for r in with_adapter]
    asked = _predict(inp, tmp / "m32_asked.jsonl", "--model.quantization", "nf4", ckpt=m32)
    assert _max_diff(as_is, asked) > 1e-3  # quantized, as asked
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _predict(inp, tmp / "m4_none.jsonl", "--model.quantization", "none", ckpt=m4)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: model.quantization=none: " in err and "is saved nf4" in err, err
