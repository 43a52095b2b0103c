"""The bad-input corpus: every kind of bad data, config and checkpoint a user can hand the CLI.

Each case runs through the CLI in-process (`cli_main`, as `python -m finllm_pl` does) and must give:
exit status 2, exactly one `error:` line that names the file and line (or the config key) and says what to do,
no traceback, and nothing half-written (no checkpoint, adapter, output, part or temp file).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finllm_pl.__main__ import cli_main

ROOT = Path(__file__).resolve().parents[1]
GOOD = '{"instruction": "Classify.", "input": "Shares rose.", "output": "positive"}\n'
ROW = '{{"instruction": "Classify.", "input": "{text}", "output": "{label}"}}\n'
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
FIT = ["fit", "--config", "configs/smoke.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
       "--trainer.num_sanity_val_steps", "0", *QUIET]
PREDICT = ["predict", "--config", "configs/smoke.yaml", *QUIET]
# What a failed run may leave: nothing (the resolved config.yaml is saved when the run starts, not before).
ALLOWED_NEW: set[str] = set()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _fails_cleanly(capsys, workdir: Path, args: list[str]) -> str:
    """Run the CLI; check exit 2, one `error:` line, no traceback, nothing half-written. Returns the line."""
    before = _files(workdir)
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    new = {f for f in _files(workdir) - before if Path(f).name not in ALLOWED_NEW}
    assert not new, f"a failed run left files behind: {sorted(new)}"
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# The corpus. Each case: (id, files to write {name: bytes}, CLI args, substrings the error line must hold: where
# the problem is (file:line or config key) and what to do about it).
# --------------------------------------------------------------------------------------------------------------
def _bad(line: str) -> bytes:
    return (GOOD + line + GOOD).encode()


def _csv(text: str) -> bytes:
    return text.encode()


PEFT_FOLDER = "not_an_adapter"

CASES = [
    # -- training data: JSONL -------------------------------------------------------------------------------
    ("truncated-json-line", {"bad.jsonl": _bad('{"instruction": "Classify.", "input": "x", "output": "posi\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:2: invalid JSON", "fix or remove the line"]),
    ("wrong-type", {"bad.jsonl": _bad('{"instruction": "Classify.", "input": 5, "output": "neutral"}\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ['bad.jsonl:2: field "input" must be a string', "quote"]),
    ("wrong-type-id", {"bad.jsonl": _bad('{"id": [1], "instruction": "C.", "input": "x", "output": "neutral"}\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ['bad.jsonl:2: field "id" must be a string or an integer', "drop"]),
    ("empty-answer", {"bad.jsonl": _bad('{"instruction": "Classify.", "input": "x", "output": "  "}\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ['bad.jsonl:2: field "output" is empty', "give it text"]),
    ("missing-answer", {"bad.jsonl": _bad('{"instruction": "Classify.", "input": "x"}\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ['bad.jsonl:2: missing field "output"', "every row needs it"]),
    ("answer-outside-label-set", {"bad.jsonl": _bad(ROW.format(text="x", label="bullish"))},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:2: answer 'bullish' is not one of", "set data.labels"]),
    ("non-object-line", {"bad.jsonl": _bad("[1, 2]\n")},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:2: expected a JSON object per line, got list", "one {"]),
    ("unknown-schema", {"bad.jsonl": _bad('{"headline": "x", "sentiment": "neutral"}\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ['bad.jsonl:2: row has neither', "see data/README.md"]),
    ("empty-text-row", {"bad.jsonl": _bad('{"text": " ", "label": "neutral"}\n')},
     FIT + ["--data.train_path", "bad.jsonl"], ['bad.jsonl:2: field "text" is empty', "remove the row"]),
    ("bom-inside-file", {"bad.jsonl": GOOD.encode() + b"\xef\xbb\xbf" + GOOD.encode()},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:2: invalid JSON", "BOM", "fix or remove the line"]),
    ("non-utf8-bytes", {"bad.jsonl": GOOD.encode() + ROW.format(text="Café", label="neutral").encode("latin-1")},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:2: not valid UTF-8 (byte 0xe9", "re-save the file as UTF-8"]),
    ("10-MB-line", {"bad.jsonl": _bad(ROW.format(text="x" * (10 << 20), label="neutral"))},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:2: line is 10.0 MiB, over the 1 MiB limit", "split or fix"]),
    ("empty-file", {"empty.jsonl": b""},
     FIT + ["--data.train_path", "empty.jsonl"], ["empty.jsonl: no rows", "give it at least one row"]),
    ("blank-lines-only", {"blank.jsonl": b"\n  \n\n"},
     FIT + ["--data.train_path", "blank.jsonl"], ["blank.jsonl: no rows", "give it at least one row"]),
    ("duplicate-ids", {"bad.jsonl": ('{"id": "a", "text": "x", "label": "neutral"}\n'
                                     '{"id": 7, "text": "y", "label": "neutral"}\n'
                                     '{"id": "a", "text": "z", "label": "neutral"}\n').encode()},
     FIT + ["--data.train_path", "bad.jsonl"], ["bad.jsonl:3: duplicate id 'a'", "line 1", "ids must be unique"]),
    ("plain-text-for-training", {"bad.txt": b"Shares rose.\n"},
     FIT + ["--data.train_path", "bad.txt"], ["bad.txt: plain-text files have no answers", ".jsonl or .csv"]),
    ("train-file-missing", {},
     FIT + ["--data.train_path", "nope.jsonl"], ["nope.jsonl: no such file", "check the path"]),
    ("train-path-is-a-folder", {"folder.jsonl/x": b""},
     FIT + ["--data.train_path", "folder.jsonl"], ["folder.jsonl: is a folder", "point to a .jsonl"]),
    ("val-file-bad", {"val.jsonl": _bad(ROW.format(text="x", label="Positive!"))},
     FIT + ["--data.val_path", "val.jsonl"], ["val.jsonl:2: answer 'Positive!' is not one of", "set data.labels"]),
    # -- training data: CSV ---------------------------------------------------------------------------------
    ("csv-without-text-column", {"bad.csv": _csv("headline,label\nShares rose.,positive\n")},
     FIT + ["--data.train_path", "bad.csv"], ["bad.csv:1: no column 'text' (columns: headline, label)",
                                                "set data.text_column"]),
    ("csv-without-label-column", {"bad.csv": _csv("text,sentiment\nShares rose.,positive\n")},
     FIT + ["--data.train_path", "bad.csv"], ["bad.csv:1: no column 'label'", "set data.label_column"]),
    ("csv-unknown-label", {"bad.csv": _csv("text,label\nShares rose.,positive\nShares fell.,bearish\n")},
     FIT + ["--data.train_path", "bad.csv"], ["bad.csv:3: answer 'bearish' is not one of", "set data.labels"]),
    ("csv-empty-text", {"bad.csv": _csv('text,label\nShares rose.,positive\n"",neutral\n')},
     FIT + ["--data.train_path", "bad.csv"], ["bad.csv:3: column 'text' is empty", "remove the row"]),
    # -- config ----------------------------------------------------------------------------------------------
    ("unknown-config-key", {}, FIT + ["--model.no_such_key", "1"], ["no_such_key", "--help"]),
    ("abbreviated-config-key", {}, FIT + ["--model.learning_rat", "0.1"], ["model.learning_rat", "--help"]),
    ("unknown-key-in-yaml", {"typo.yaml": b"model:\n  lora_rank: 8\n"},
     FIT + ["--config", "typo.yaml"], ["lora_rank", "--help"]),
    ("config-file-missing", {}, FIT + ["--config", "configs/nope.yaml"], ["configs/nope.yaml", "--help"]),
    ("config-yaml-syntax", {"broken.yaml": b"model:\n  lora_r: 8\n   lora_alpha: 16\n"},
     FIT + ["--config", "broken.yaml"], ["broken.yaml:3: not a valid YAML config", "fix the file"]),
    ("zero-batch-size", {}, FIT + ["--data.batch_size", "0"], ["data.batch_size must be >= 1, got 0"]),
    ("negative-batch-size", {}, FIT + ["--data.batch_size", "-4"], ["data.batch_size must be >= 1, got -4"]),
    ("zero-eval-batch-size", {}, FIT + ["--data.eval_batch_size", "0"], ["data.eval_batch_size must be >= 1"]),
    ("zero-eval-batch-tokens", {}, FIT + ["--data.eval_batch_tokens", "0"], ["data.eval_batch_tokens must be >= 1"]),
    ("merge-into-4bit", {}, FIT + ["--model.merge_for_labeling", "true", "--model.backend", "plain"],
     ["model.merge_for_labeling", "model.backend fast"]),
    ("unknown-fast-component", {}, FIT + ["--model.fast_skip", "[turbo]"],
     ["model.fast_skip: unknown component(s) ['turbo']", "the components are"]),
    ("zero-chunk-tokens", {}, FIT + ["--model.chunk_tokens", "0"], ["model.chunk_tokens must be >= 1 or null"]),
    ("wrong-type-config-value", {}, FIT + ["--data.batch_size", "eight"], ["data.batch_size", "--help"]),
    ("negative-learning-rate", {}, FIT + ["--model.learning_rate=-1e-4"], ["model.learning_rate must be > 0"]),
    ("unknown-lr-decay", {}, FIT + ["--model.lr_decay", "exponential"], ["model.lr_decay", "--help"]),
    ("zero-accumulation", {}, FIT + ["--model.accumulate_grad_batches", "0"],
     ["model.accumulate_grad_batches must be >= 1"]),
    ("trainer-accumulation", {}, FIT + ["--trainer.accumulate_grad_batches", "4"],
     ["trainer.accumulate_grad_batches", "use model.accumulate_grad_batches"]),
    ("warmup-longer-than-run", {}, FIT + ["--model.warmup_steps", "50", "--model.warmup_overflow", "error"],
     ["model.warmup_steps=50 is not shorter than the whole run (1 optimizer steps)", "Set model.warmup_steps lower"]),
    ("negative-warmup", {}, FIT + ["--model.warmup_steps", "-1"], ["model.warmup_steps must be >= 0"]),
    ("zero-max-steps", {}, FIT + ["--trainer.max_steps", "0"], ["trainer.max_steps", "train nothing"]),
    ("zero-max-epochs", {}, FIT + ["--trainer.max_steps", "-1", "--trainer.max_epochs", "0"],
     ["trainer.max_epochs", "train nothing"]),
    ("endless-run", {}, FIT + ["--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"],
     ["set trainer.max_epochs or trainer.max_steps"]),
    ("val-fraction-out-of-range", {}, FIT + ["--data.val_fraction", "1.5"], ["data.val_fraction must be in [0, 1)"]),
    ("duplicate-labels", {}, FIT + ["--data.labels", "[positive, positive]"],
     ["data.labels must be a non-empty list of distinct labels"]),
    ("max-length-too-small", {}, FIT + ["--data.max_length", "8"], ["data.max_length=8", "raise data.max_length"]),
    ("chat-style-without-template", {}, FIT + ["--model.model_name_or_path", "no_template"]
     + ["--data.prompt_style", "chat"], ["data.prompt_style=chat", "use data.prompt_style=plain"]),
    ("lora-rank-zero", {}, FIT + ["--model.lora_r", "0"], ["model.lora_r must be >= 1"]),
    ("lora-targets-not-in-model", {}, FIT + ["--model.lora_target_modules", "[q_proj, w_pack]"],
     ["model.lora_target_modules: ['w_pack'] not in this model", "its linear layers are"]),
    ("missing-model-folder", {}, FIT + ["--model.model_name_or_path", "./models/nope"],
     ["model.model_name_or_path='./models/nope': no such folder", "check the path"]),
    ("model-folder-without-config", {"models/empty/readme.txt": b"x"},
     FIT + ["--model.model_name_or_path", "models/empty"], ["models/empty", "no config.json"]),
    ("unknown-builtin-model", {}, FIT + ["--model.model_name_or_path", "builtin:huge"], ["builtin:huge"]),
    ("checkpoint-dir-read-only", {}, FIT + ["--checkpoint.dirpath", "locked/run"],
     ["checkpoint.dirpath", "locked", "not writable"]),
    # -- checkpoints -------------------------------------------------------------------------------------------
    ("corrupted-checkpoint", {"broken.ckpt": b"PK\x03\x04 not really a checkpoint"},
     FIT + ["--ckpt_path", "broken.ckpt"], ["broken.ckpt: checkpoint is corrupted", "resume from another one"]),
    ("empty-checkpoint-file", {"empty.ckpt": b""},
     FIT + ["--ckpt_path", "empty.ckpt"], ["empty.ckpt: checkpoint is corrupted", "resume from another one"]),
    ("truncated-checkpoint", {"cut.ckpt": "TRUNCATED"},
     FIT + ["--ckpt_path", "cut.ckpt"], ["cut.ckpt: checkpoint is corrupted", "resume from another one"]),
    ("checkpoint-not-lightning", {"plain.ckpt": "PLAIN"},
     FIT + ["--ckpt_path", "plain.ckpt"], ["plain.ckpt: not a Lightning checkpoint", "give a .ckpt written by fit"]),
    ("checkpoint-missing", {}, FIT + ["--ckpt_path", "gone.ckpt"], ["gone.ckpt: no such checkpoint file",
                                                                     "check --ckpt_path"]),
    ("checkpoint-folder-not-adapter", {f"{PEFT_FOLDER}/x.txt": b"x"}, FIT + ["--ckpt_path", PEFT_FOLDER],
     [f"{PEFT_FOLDER}: folder is neither an adapter", "give a .ckpt"]),
    ("checkpoint-other-lora-rank", {"r4.ckpt": "R4"}, FIT + ["--ckpt_path", "r4.ckpt"],
     ["r4.ckpt", "r=4", "r=8", "use the matching config"]),
    ("last-checkpoint-other-lora-rank", {"checkpoints/smoke/last.ckpt": "R4"}, FIT + ["--ckpt_path", "last"],
     ["last.ckpt", "r=4", "r=8", "use the matching config"]),
    ("checkpoint-other-base-model", {"r8.ckpt": "R8"},
     FIT + ["--ckpt_path", "r8.ckpt", "--model.model_name_or_path", "other_base"],
     ["r8.ckpt", "builtin:tiny-deepseek", "other_base", "use the matching config"]),
    ("last-checkpoint-other-base-model", {"checkpoints/smoke/last.ckpt": "R8"},
     FIT + ["--ckpt_path", "last", "--model.model_name_or_path", "other_base"],
     ["last.ckpt", "builtin:tiny-deepseek", "other_base", "use the matching config"]),
    ("predict-checkpoint-explicit-other-lora-rank", {"r4.ckpt": "R4"},  # an explicit setting beats the .ckpt's
     PREDICT + ["--ckpt_path", "r4.ckpt", "--model.lora_r", "8"], ["r4.ckpt", "r=4", "r=8", "use the matching config"]),
    ("checkpoint-with-code", {"evil.ckpt": "EVIL"}, FIT + ["--ckpt_path", "evil.ckpt"],
     ["evil.ckpt: checkpoint is corrupted or not a checkpoint", "Weights only load failed"]),
    # -- prediction input and output -----------------------------------------------------------------------------
    ("predict-path-unset", {}, PREDICT, ["data.predict_path is not set", "give the file to label"]),
    ("predict-file-missing", {}, PREDICT + ["--data.predict_path", "nope.txt"],
     ["nope.txt: no such file", "check data.predict_path"]),
    ("predict-non-utf8", {"in.txt": b"Shares rose.\nCaf\xe9 sales fell.\n"}, PREDICT + ["--data.predict_path", "in.txt"],
     ["in.txt:2: not valid UTF-8", "re-save the file as UTF-8"]),
    ("predict-bad-row-after-first-chunk",
     {"in.jsonl": "".join(f'{{"text": "row {i}"}}\n' for i in range(9)).encode() + b'{"text": "row 9"\n'},
     PREDICT + ["--data.predict_path", "in.jsonl", "--data.predict_chunk_rows", "4"],
     ["in.jsonl:10: invalid JSON", "fix or remove the line"]),
    ("predict-duplicate-ids", {"in.jsonl": b'{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": "1", "text": "c"}\n'},
     PREDICT + ["--data.predict_path", "in.jsonl"], ["in.jsonl:3: duplicate id '1'", "ids must be unique"]),
    ("predict-max-length-too-small", {"in.txt": b"Shares rose.\n"},
     PREDICT + ["--data.predict_path", "in.txt", "--data.max_length", "8"], ["data.max_length=8", "raise data.max_length"]),
    ("predict-empty-file", {"in.txt": b""}, PREDICT + ["--data.predict_path", "in.txt"],
     ["in.txt: no rows", "give it at least one row"]),
    ("predict-csv-without-text-column", {"in.csv": b"headline\nShares rose.\n"},
     PREDICT + ["--data.predict_path", "in.csv"], ["in.csv:1: no column 'text'", "set data.text_column"]),
    ("predict-output-folder-missing", {"in.txt": b"Shares rose.\n"},
     PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output", "no/such/folder/out.jsonl"],
     ["no/such/folder/out.jsonl", "does not exist", "create it or set data.predict_output"]),
    ("predict-output-folder-read-only", {"in.txt": b"Shares rose.\n"},
     PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output", "locked/out.jsonl"],
     ["locked/out.jsonl", "not writable", "set data.predict_output elsewhere"]),
    ("predict-output-is-a-folder", {"in.txt": b"Shares rose.\n", "out.jsonl/x": b""},
     PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output", "out.jsonl"],
     ["out.jsonl", "is a folder", "data.predict_output"]),
    ("predict-kept-field-missing", {"in.jsonl": b'{"text": "a", "ticker": "X"}\n\n{"text": "b"}\n'},
     PREDICT + ["--data.predict_path", "in.jsonl", "--data.keep_fields", "[ticker]"],
     ['in.jsonl:3: no field "ticker" in this row', "data.keep_fields"]),
    ("predict-kept-column-missing", {"in.csv": b"text,date\nShares rose.,2024\n"},
     PREDICT + ["--data.predict_path", "in.csv", "--data.keep_fields", "[date, ticker]"],
     ["in.csv:1: no column 'ticker' (columns: text, date)", "data.keep_fields"]),
    ("predict-kept-field-of-plain-text", {"in.txt": b"Shares rose.\n"},
     PREDICT + ["--data.predict_path", "in.txt", "--data.keep_fields", "[date]"],
     ["in.txt:1: plain-text rows have only the field 'text', not 'date'", "remove it from data.keep_fields"]),
    ("predict-kept-field-named-like-an-output-key", {"in.jsonl": b'{"text": "a", "label": "neutral"}\n'},
     PREDICT + ["--data.predict_path", "in.jsonl", "--data.keep_fields", "[label]"],
     ["data.keep_fields: 'label' is a key predict writes itself", "gold"]),
    ("predict-path-is-a-folder", {"news/in.txt": b"Shares rose.\n"}, PREDICT + ["--data.predict_path", "news"],
     ["news: is a folder, not a file", "give the file to label"]),
    ("predict-output-in-a-system-folder", {"in.txt": b"Shares rose.\n"},
     PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output", "/sys/x.jsonl"],
     ["data.predict_output=/sys/x.jsonl: folder /sys is not writable", "set data.predict_output elsewhere"]),
    ("predict-output-folder-is-a-file", {"in.txt": b"Shares rose.\n", "afile": b"x"},
     PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output", "afile/out.jsonl"],
     ["data.predict_output=afile/out.jsonl: afile is a file, not a folder", "set data.predict_output"]),
    ("predict-default-output-folder-is-a-file", {"in.txt": b"Shares rose.\n", "predictions": b"x"},
     PREDICT + ["--data.predict_path", "in.txt"],
     ["data.predict_output is unset and its default folder predictions is a file", "set data.predict_output"]),
    ("predict-output-not-written-by-predict", {"in.txt": b"Shares rose.\n", "notes.jsonl": b'{"my": "notes"}\n'},
     PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output", "notes.jsonl"],
     ["notes.jsonl: exists and was not written by predict (no notes.jsonl.job.json beside it)",
      "set data.predict_output to another file, or data.overwrite true to replace it"]),
    ("validate-nothing-to-validate", {}, ["validate", "--config", "configs/smoke.yaml", *QUIET,
                                          "--data.val_fraction", "0"], ["nothing to validate", "set data.val_path"]),
]


class _Evil:
    """A pickle that would create a file when unpickled by a loader that runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _real_checkpoint(store: Path, name: str, *args: str) -> Path:
    """A real one-step checkpoint of the smoke config (cached per test session)."""
    out = store / name
    if not (out / "last.ckpt").exists():
        cwd = os.getcwd()
        os.chdir(store)
        try:
            cli_main(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--data.train_path",
                      str(ROOT / "data/sample.jsonl"), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                      "--trainer.num_sanity_val_steps", "0", "--checkpoint.dirpath", name, *QUIET, *args])
        finally:
            os.chdir(cwd)
    return out / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    store = tmp_path_factory.mktemp("ckpts")
    return {"R8": _real_checkpoint(store, "r8"), "R4": _real_checkpoint(store, "r4", "--model.lora_r", "4")}


def _special(workdir: Path, name: str, spec: str, checkpoints) -> None:
    path = workdir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec in ("R4", "R8"):
        shutil.copy(checkpoints[spec], path)
    elif spec == "TRUNCATED":
        data = checkpoints["R8"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif spec == "PLAIN":
        torch.save({"weights": torch.zeros(2)}, path)
    elif spec == "EVIL":
        torch.save({"state_dict": {}, "payload": _Evil(str(workdir / "PWNED"))}, path)
    else:
        raise AssertionError(spec)


@pytest.fixture
def locked(workdir):
    """A folder this process cannot write to (chattr +i as root, chmod 555 otherwise)."""
    folder = workdir / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.mark.parametrize("name, files, args, expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_cleanly(name, files, args, expect, workdir, capsys, request, tiny_dir):
    checkpoints = request.getfixturevalue("checkpoints") if any(isinstance(v, str) for v in files.values()) else None
    if "locked" in " ".join(args):
        request.getfixturevalue("locked")
    if "no_template" in args:  # the tiny model's tokenizer without its chat template
        shutil.copytree(tiny_dir, workdir / "no_template")
        cfg = workdir / "no_template" / "tokenizer_config.json"
        tc = json.loads(cfg.read_text())
        tc.pop("chat_template", None)
        cfg.write_text(json.dumps(tc))
        (workdir / "no_template" / "chat_template.jinja").unlink(missing_ok=True)
    if "other_base" in args:  # the same architecture under another name: an adapter must not move between bases
        shutil.copytree(tiny_dir, workdir / "other_base")
    for rel, content in files.items():
        if isinstance(content, str):
            _special(workdir, rel, content, checkpoints)
        else:
            path = workdir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    line = _fails_cleanly(capsys, workdir, args)
    for part in expect:
        assert part in line, f"{part!r} not in {line!r}"
    assert not (workdir / "PWNED").exists(), "unpickling a checkpoint ran code"


def test_an_unwritable_output_stops_predict_before_the_model_loads(workdir, locked, capsys, monkeypatch):
    """The output is checked before anything is loaded: not after minutes of loading a model."""
    from finllm_pl.module import FinLLM

    (workdir / "in.txt").write_text("Shares rose.\n")
    monkeypatch.setattr(FinLLM, "configure_model", lambda self: (_ for _ in ()).throw(AssertionError("model loaded")))
    line = _fails_cleanly(capsys, workdir, PREDICT + ["--data.predict_path", "in.txt", "--data.predict_output",
                                                      "locked/out.jsonl"])
    assert "locked/out.jsonl" in line and "not writable" in line


def _load_error(path: Path) -> str:
    """What torch itself says about the file (its first line)."""
    try:
        torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        return " ".join(str(e).split()) or type(e).__name__
    raise AssertionError(f"{path} loaded")


@pytest.mark.parametrize("kind, says", [
    ("empty", ["the file is empty"]),
    ("garbage", ["not a complete checkpoint", "cut short"]),
    ("truncated", ["not a complete checkpoint", "cut short"]),
    ("code", ["Weights only load failed", "posix.system", "run code"]),
    ("text", ["not a file torch.save wrote"]),
])
def test_a_corrupted_checkpoint_says_why_in_whole_words(kind, says, workdir, capsys):
    """The reason in a corrupted checkpoint's one line is short and whole: not torch's text cut mid-word."""
    path = workdir / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[:9000])
    elif kind == "code":
        torch.save({"state_dict": {}, "payload": _Evil(str(workdir / "PWNED"))}, path)
    else:
        path.write_text("a text file, not a checkpoint\n")
    full = _load_error(path)
    line = _fails_cleanly(capsys, workdir, FIT + ["--ckpt_path", path.name])
    head = f"error: {path.name}: checkpoint is corrupted or not a checkpoint ("
    assert line.startswith(head) and line.endswith("); resume from another one (checkpoints/<run>/*.ckpt)"), line
    why = line[len(head):-len("); resume from another one (checkpoints/<run>/*.ckpt)")]
    for part in says:
        assert part in why, (part, why)
    assert len(why) <= 160, why
    stem = why.removesuffix("...")
    if full.startswith(stem) and len(stem) < len(full):  # torch's own text, shortened: after a whole word, marked
        assert why.endswith("...") and full[len(stem)] == " ", f"torch's text cut mid-word: {why!r}"
    assert not (workdir / "PWNED").exists()


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_bom_at_file_start_is_fine(tmp_path):
    """A UTF-8 BOM at the start of a file (Excel, Notepad) is not an error: it is dropped."""
    from finllm_pl.records import iter_rows

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (GOOD * 2).encode())
    rows = list(iter_rows(str(p), "Classify.", labels=["negative", "neutral", "positive"]))
    assert [r.output for r in rows] == ["positive", "positive"] and rows[0].instruction == "Classify."
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbftext,label\nShares rose.,positive\n")
    assert [r.input for r in iter_rows(str(c), "Classify.")] == ["Shares rose."]


def test_the_duplicate_id_check_is_exact_and_small(tmp_path, monkeypatch):
    """Ids are remembered as 8-byte digests (a labeling input has millions); a digest match is confirmed on the
    text, so even a file where every digest collides gets no false duplicate, and a real one is still found."""
    from finllm_pl import records

    seen = records._SeenIds()
    for i in range(200_000):
        d = seen.digest(f"r{i:07d}")
        assert d not in seen
        seen.add(d)
    assert seen.digest("r0123456") in seen and seen.digest("r9999999") not in seen
    assert sum(run.nbytes for run in seen.runs) <= 8 * 200_000

    monkeypatch.setattr(records._SeenIds, "digest", staticmethod(lambda rid: 42))  # every id collides
    p = tmp_path / "ids.jsonl"
    p.write_text("".join(f'{{"id": "x{i}", "text": "t"}}\n' for i in range(50)))
    assert [r.id for r in records.iter_rows(str(p), "I", need_output=False)] == [f"x{i}" for i in range(50)]
    p.write_text('{"id": "a", "text": "t"}\n{"id": "b", "text": "t"}\n\n{"id": "a", "text": "t"}\n')
    with pytest.raises(records.DataError, match="ids.jsonl:4: duplicate id 'a' \\(first at line 1\\)"):
        list(records.iter_rows(str(p), "I", need_output=False))


def test_the_module_entry_point_exits_2_without_traceback(workdir):
    """The same contract through `python -m finllm_pl` in a fresh process (no pytest capture involved)."""
    (workdir / "bad.jsonl").write_bytes(_bad('{"instruction": "Classify.", "input": "x", "output": "posi\n'))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "finllm_pl", *FIT, "--data.train_path", "bad.jsonl"], cwd=workdir,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: bad.jsonl:2: invalid JSON (") and \
        lines[0].endswith("at column 59); fix or remove the line"), r.stderr


@pytest.mark.parametrize("config", sorted(glob.glob(str(ROOT / "configs/*.yaml"))), ids=lambda p: Path(p).name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", config, "--print_config"])
    assert exc.value.code in (0, None)
    assert "model_name_or_path" in capsys.readouterr().out
