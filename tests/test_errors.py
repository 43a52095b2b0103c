"""Bad input gets one clear line naming the file:line (or config key) and a non-zero exit, no traceback."""

import glob

import pytest

from finllm_pl.__main__ import cli_main

GOOD = '{"instruction": "Classify.", "input": "Shares rose.", "output": "positive"}\n'


def _fit_error(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", "configs/smoke.yaml", "--trainer.max_steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert not any("Traceback" in line for line in err)
    return [line for line in err if line.startswith("error:")]


@pytest.mark.parametrize("bad, expect", [
    ('{"instruction": "Classify.", "input": "x", "output": "positive"\n', "bad.jsonl:2: invalid JSON"),
    ('{"instruction": "Classify.", "input": "x"}\n', 'bad.jsonl:2: missing field "output"'),
    ('{"instruction": "Classify.", "input": 5, "output": "neutral"}\n', 'bad.jsonl:2: field "input" must be a string'),
    ('{"instruction": "Classify.", "input": "x", "output": "  "}\n', 'bad.jsonl:2: field "output" is empty'),
    ('{"instruction": "Classify.", "input": "x", "output": "bullish"}\n', "bad.jsonl:2: answer 'bullish' is not one of"),
    ('[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
])
def test_bad_rows_name_file_and_line(workdir, capsys, bad, expect):
    (workdir / "bad.jsonl").write_text(GOOD + bad + GOOD)
    lines = _fit_error(capsys, "--data.train_path", "bad.jsonl")
    assert len(lines) == 1 and expect in lines[0], lines


def test_not_utf8_and_empty_file(workdir, capsys):
    (workdir / "latin.jsonl").write_bytes(GOOD.encode() + '{"instruction": "C", "input": "Café", "output": "neutral"}\n'.encode("latin-1"))
    assert "latin.jsonl:2: not valid UTF-8" in _fit_error(capsys, "--data.train_path", "latin.jsonl")[0]
    (workdir / "empty.jsonl").write_text("")
    assert "empty.jsonl: no rows" in _fit_error(capsys, "--data.train_path", "empty.jsonl")[0]


def test_unknown_config_key_and_bad_values(workdir, capsys):
    assert "model.learning_rat" in " ".join(_fit_error(capsys, "--model.learning_rat", "0.1"))  # no abbreviations
    assert "no_such_key" in " ".join(_fit_error(capsys, "--model.no_such_key", "1"))
    assert "data.batch_size must be >= 1" in _fit_error(capsys, "--data.batch_size", "0")[0]


def test_missing_model_folder_and_unknown_lora_target(workdir, capsys):
    assert "no such folder" in _fit_error(capsys, "--model.model_name_or_path", "./models/nope")[0]
    lines = _fit_error(capsys, "--model.lora_target_modules", "[q_proj, w_pack]")
    assert "model.lora_target_modules: ['w_pack'] not in this model" in lines[0]


def test_corrupted_checkpoint(workdir, capsys):
    (workdir / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    lines = _fit_error(capsys, "--ckpt_path", "broken.ckpt")
    assert "broken.ckpt: checkpoint is corrupted" in lines[0]


@pytest.mark.parametrize("config", sorted(glob.glob("configs/*.yaml")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", config, "--print_config"])
    assert exc.value.code in (0, None)
    assert "model_name_or_path" in capsys.readouterr().out
