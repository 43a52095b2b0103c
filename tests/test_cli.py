"""The command line as a user meets it (issue 26): --help, --print_config, checks before any work, what a run writes
and where, what it prints."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from finllm_pl import __main__ as entry
from finllm_pl.__main__ import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _exit_code(fn, *args) -> int:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return e.value.code or 0


def _commands(help_text: str) -> dict[str, str]:
    """{command: its one help line} from a top-level --help."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Available subcommands:")
    out = {}
    for line in lines[start + 1:]:
        parts = line.split(None, 1)
        if len(parts) == 2 and line.startswith("    ") and not line.startswith("      "):
            out[parts[0]] = parts[1]
    return out


COMMANDS = ["fit", "validate", "predict", "export", "calibrate"]


# -- 1. --help ----------------------------------------------------------------------------------------------------
def test_help_names_the_program_and_lists_every_command_with_one_line():
    r = subprocess.run([sys.executable, "-m", "finllm_pl", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m finllm_pl "), r.stdout[:200]
    commands = _commands(r.stdout)
    assert list(commands) == COMMANDS, r.stdout
    assert all(len(line) > 20 for line in commands.values()), commands
    assert "{" + ",".join(COMMANDS) + "}" in r.stdout.split("\n\n")[0]  # the usage line(s); no `test`


@pytest.mark.parametrize("command", COMMANDS)
def test_every_listed_command_has_help(command, capsys):
    assert _exit_code(main, [command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m finllm_pl {command} "), out[:200]


def test_test_is_not_a_command(capsys):
    """Lightning's `test` crashed (no test_step): it is no command here, said in one line."""
    assert _exit_code(main, ["test", "--config", "configs/smoke.yaml"]) == 2
    err = capsys.readouterr().err
    assert "MisconfigurationException" not in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")], err


def test_the_console_script_runs_every_command(monkeypatch, capsys):
    """pyproject's `finllm` script: the same commands (export included), its own name in the usage line."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["finllm"].split(":")
    assert module == "finllm_pl.__main__"
    script = getattr(entry, func)
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/finllm", "--help"])
    assert _exit_code(script) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: finllm ") and list(_commands(out)) == COMMANDS
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/finllm", "export", "--help"])
    assert _exit_code(script) == 0
    assert capsys.readouterr().out.startswith("usage: finllm export ")


def test_a_plain_command_is_one_line_in_the_table(monkeypatch, capsys, tmp_path):
    """A plain argparse command (as `calibrate` is) is one entry of PLAIN_COMMANDS: listed, dispatched."""
    (tmp_path / "fake_audit.py").write_text(
        "import argparse\n"
        "def main(argv, prog):\n"
        "    p = argparse.ArgumentParser(prog=prog)\n"
        "    p.add_argument('--x')\n"
        "    print('audited', p.parse_args(argv).x)\n"
        "    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(entry.PLAIN_COMMANDS, "audit", ("fake_audit", "check a labelled file"))
    assert _exit_code(main, ["--help"]) == 0
    assert _commands(capsys.readouterr().out)["audit"] == "check a labelled file"
    assert _exit_code(main, ["audit", "--x", "7"]) == 0
    assert capsys.readouterr().out == "audited 7\n"
    assert _exit_code(main, ["audit", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m finllm_pl audit ")


# -- 2. --print_config ----------------------------------------------------------------------------------------------
def test_print_config_documents_every_option(capsys):
    """The plain --print_config is the documented form: each option's help as a YAML comment above it, and the YAML
    still loads to the same values."""
    import yaml

    assert _exit_code(cli_main, ["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--print_config"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "  # LoRA rank." in lines and lines[lines.index("  # LoRA rank.") + 1] == "  lora_r: 8"
    assert any(line.startswith("  # training micro-batch size per device") for line in lines)
    keyed = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.lstrip().startswith(("#", "-"))
             and ":" in line and not line.startswith("   ")]
    documented = [i for i in keyed if lines[i - 1].lstrip().startswith("#")]
    assert len(documented) >= 0.9 * len(keyed), [lines[i] for i in keyed if i not in documented]
    loaded = yaml.safe_load(text)
    assert loaded["model"]["lora_r"] == 8 and loaded["data"]["batch_size"] == 8
    assert _exit_code(cli_main, ["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--print_config=skip_default"]) == 0
    assert "  # LoRA rank." in capsys.readouterr().out.splitlines()


def test_help_and_readme_say_how_to_print_the_documented_config(capsys):
    assert _exit_code(main, ["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--print_config" in out and "comments" in out
    readme = (ROOT / "README.md").read_text()
    assert "python -m finllm_pl fit --config <cfg> --print_config" in readme


# -- 3. checks before any work; a failed start writes nothing ----------------------------------------------------
# The default logger (TensorBoard) on, as a user runs it.
FIT_LOGGED = ["fit", "--config", "configs/smoke.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches",
              "0", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"]


def _tree(root: Path) -> set[str]:
    """Every file and folder under root."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--model.lora_r", "0"], "model.lora_r must be >= 1, got 0"),
    (["--model.lora_alpha", "0"], "model.lora_alpha must be > 0, got 0"),
    (["--model.lora_dropout", "1.0"], "model.lora_dropout must be in [0, 1), got 1.0"),
    (["--model.lora_target_modules", "[]"], "model.lora_target_modules is empty"),
    (["--model.model_name_or_path", "./models/nope"], "model.model_name_or_path='./models/nope': no such folder"),
    (["--model.model_name_or_path", "builtin:huge"], "model.model_name_or_path='builtin:huge': unknown built-in"),
    (["--model.lora_target_modules", "[q_proj, w_pack]"], "model.lora_target_modules: ['w_pack'] not in this model"),
    (["--model.adapter_path", "no/adapter"], "model.adapter_path=no/adapter: no such folder"),
], ids=["lora-r-0", "lora-alpha-0", "lora-dropout-1", "no-targets", "missing-model-folder", "unknown-builtin",
        "target-not-in-model", "missing-adapter"])
def test_a_bad_model_setting_stops_before_the_data_is_read(args, says, workdir, capsys, monkeypatch, tiny_dir):
    """Said in one line before the data is read or the model loads, and nothing is written: no lightning_logs,
    no config.yaml, no events file, no checkpoint folder."""
    from finllm_pl.data import InstructionDataModule
    from finllm_pl.module import FinLLM

    def refuse(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} before the config was checked")
        return fail

    monkeypatch.setattr(InstructionDataModule, "setup", refuse("the data was read"))
    monkeypatch.setattr(FinLLM, "configure_model", refuse("the model was loaded"))
    before = _tree(workdir)
    assert _exit_code(cli_main, FIT_LOGGED + args) == 2
    line = _one_error_line(capsys)
    assert says in line, line
    assert _tree(workdir) == before


@pytest.mark.parametrize("case", ["bad-data-row", "warmup-error", "checkpoint-of-another-shape"])
def test_a_run_that_fails_before_its_first_step_writes_nothing(case, workdir, capsys, tmp_path_factory):
    """Errors that only the data or the loaded model can show: still one line, and the working folder as it was."""
    args = list(FIT_LOGGED)
    if case == "bad-data-row":
        (workdir / "bad.jsonl").write_text('{"text": "Shares rose.", "label": "positive"}\n{"text": "x"\n')
        args += ["--data.train_path", "bad.jsonl"]
    elif case == "warmup-error":
        args += ["--model.warmup_steps", "50", "--model.warmup_overflow", "error"]
    else:
        store = tmp_path_factory.mktemp("r4")
        cli_main(FIT_LOGGED + ["--model.lora_r", "4", "--trainer.logger", "false", "--checkpoint.dirpath",
                               str(store)])
        capsys.readouterr()
        args += ["--ckpt_path", str(store / "last.ckpt")]
    before = _tree(workdir)
    assert _exit_code(cli_main, args) == 2
    _one_error_line(capsys)
    assert _tree(workdir) == before


# -- 4-6. one short session as a user runs it: fit, a resume, validate, predict, in a fresh process -----------------
SESSION = """
import sys
from finllm_pl.__main__ import main
quiet = ["--config", "configs/smoke.yaml", "--trainer.enable_progress_bar", "false"]
fit = ["fit", *quiet, "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
       "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
       "--checkpoint.every_n_train_steps", "2", "--model.warmup_steps", "50"]
main(fit + ["--trainer.max_steps", "4"])
main(fit + ["--trainer.max_steps", "6", "--ckpt_path", "last"])       # resumed mid-epoch, into the same folder
main(["validate", *quiet, "--ckpt_path", "checkpoints/smoke/last.ckpt"])
main(["predict", *quiet, "--ckpt_path", "checkpoints/smoke/adapter", "--data.predict_path", "news.txt"])
"""


@pytest.fixture(scope="module")
def session(tmp_path_factory, _isolated_cache, tiny_dir):
    """(work folder, everything the process printed on stdout and stderr)."""
    import shutil

    work = tmp_path_factory.mktemp("session")
    shutil.copytree(ROOT / "data", work / "data")
    shutil.copytree(ROOT / "configs", work / "configs")
    lines = [line for line in (ROOT / "data/sample_unlabeled.txt").read_text().splitlines(True) if line.strip()]
    (work / "news.txt").write_text("".join(lines[:6]))
    r = subprocess.run([sys.executable, "-c", SESSION], cwd=work, env={**ENV, "FINLLM_CACHE": str(_isolated_cache)},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return work, r.stdout + r.stderr


NOISE = [
    "💡 Tip",  # Lightning's litlogger / litmodels advertisements
    "Couldn't infer the batch indices",  # predict's writer does not use them
    "dataloader is not resumable",  # the DataModule's state_dict makes the resume exact
    "no pre-optimization state was saved",  # our checkpoints are taken right after an optimizer step, on purpose
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes falls back to its own kernel
    "Skipping publisher trust check",  # (the same kernel, looked up offline)
    "exists and is not empty",  # a resume into its own checkpoint folder
    "skip_none parameter was deprecated",  # Lightning's call into jsonargparse
]


def test_a_session_prints_no_false_or_useless_warning_but_the_real_ones(session):
    work, out = session
    printed = [line for line in out.splitlines() if any(noise in line for noise in NOISE)]
    assert not printed, "\n".join(printed)
    assert "model.warmup_steps=50 is not shorter than the whole run" in out  # a real warning still shows
    assert "adapter exported to" in out and "validation: accuracy" in out and "news.txt" in out


def test_in_process_runs_warn_none_of_it_either(workdir, recwarn, capsys):
    """The same silence where the caller resets the warning filters (pytest, for each test): checkpoints at every
    optimizer step, then a resume mid-epoch into the same folder."""
    args = ["fit", "--config", "configs/smoke.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger",
            "false", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--checkpoint.every_n_train_steps", "1"]
    cli_main(args + ["--trainer.max_steps", "2"])
    cli_main(args + ["--trainer.max_steps", "3", "--ckpt_path", "last"])
    said = [str(w.message) for w in recwarn.list] + capsys.readouterr().err.splitlines()
    printed = [m for m in said if any(noise in m for noise in NOISE)]
    assert not printed, "\n".join(printed)
    cli_main(args + ["--trainer.max_steps", "1"])  # a new run into that folder, not a resume: worth a warning
    assert any("exists and is not empty" in str(w.message) for w in recwarn.list)


def _events(folder: Path):
    """TensorBoard's reading of the one events file in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    ea = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_each_command_writes_its_logs_where_the_readme_says(session):
    """fit and its resume: lightning_logs/version_0 and version_1; validate: eval/validate-<time>/ (report, scalars,
    config); predict: its labels, no TensorBoard folder. No hp_metric = -1 anywhere."""
    import re

    work, _ = session
    run = work / "checkpoints/smoke"
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    # checkpoint names are optimizer steps (a "step" logged by validation for TensorBoard must not rename them)
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt",
                                                          "step=000006.ckpt"]
    for version in ("version_0", "version_1"):
        names = {p.name for p in (run / "lightning_logs" / version).iterdir()}
        assert {"config.yaml", "hparams.yaml", "validation.json"} <= names, names
    evals = list((run / "eval").iterdir())
    assert len(evals) == 1 and re.fullmatch(r"validate-\d{8}-\d{6}", evals[0].name), evals
    names = {p.name for p in evals[0].iterdir()}
    assert {"config.yaml", "validation.json", "validation.md", "validation_confusion.png"} <= names, names
    events = sorted(str(p.parent.relative_to(run)) for p in run.rglob("events.out.tfevents.*"))
    assert events == ["eval/" + evals[0].name, "lightning_logs/version_0", "lightning_logs/version_1"], events
    assert (work / "predictions/news.txt.labels.jsonl").exists()
    assert not (work / "predictions/lightning_logs").exists() and not (work / "lightning_logs").exists()
    for folder in events:
        assert "hp_metric" not in _events(run / folder).Tags()["scalars"], folder
    layout = (ROOT / "README.md").read_text().split("## Output layout", 1)[1].split("##", 1)[0]
    assert "checkpoints/<run>/eval/validate-<date>-<time>/" in layout and "lightning_logs/version_N/" in layout


def test_tensorboard_has_one_step_axis_the_optimizer_steps_and_sample_predictions(session):
    """Every scalar, image and text at the optimizer step (trainer.global_step): fit's train/* at each step (log
    every 1), its validations (every 2 steps) at theirs, the resume's from step 5, validate's at its checkpoint's
    step; 8 sample predictions (text, gold, predicted, probabilities) with each validation."""
    work, _ = session
    run = work / "checkpoints/smoke"
    expected = {"lightning_logs/version_0": ([1, 2, 3, 4], [2, 4]), "lightning_logs/version_1": ([5, 6], [6]),
                next(str(p.relative_to(run)) for p in (run / "eval").iterdir()): ([], [6])}
    for folder, (train_steps, val_steps) in expected.items():
        ea = _events(run / folder)
        scalars = ea.Tags()["scalars"]
        train = [t for t in scalars if t.startswith("train/")]
        val = [t for t in scalars if t.startswith("val/")]
        calibration = [t for t in scalars if t.startswith("calibration/")]  # fit's end: ECE, Brier before/after
        assert set(scalars) == set(train) | set(val) | set(calibration), (folder, scalars)  # (no "epoch")
        assert (len(train) == 6) == (len(calibration) == 4) == bool(train_steps) and len(val) == 6, (folder, scalars)
        for tag in calibration:
            assert [e.step for e in ea.Scalars(tag)] == train_steps[-1:], (folder, tag)
        for tag in train:
            assert [e.step for e in ea.Scalars(tag)] == train_steps, (folder, tag)
        for tag in val:
            assert [e.step for e in ea.Scalars(tag)] == val_steps, (folder, tag)
        assert [e.step for e in ea.Images("val/confusion_matrix")] == val_steps, folder
        text = ea.Tensors("val/samples/text_summary")
        assert [e.step for e in text] == val_steps, folder
        table = text[-1].tensor_proto.string_val[0].decode()
        rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert len(rows) == 8, table
        assert "Assistant" not in table and "What is the sentiment" not in table, table  # the input text alone
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[1] in ("negative", "neutral", "positive") and cells[2] in ("negative", "neutral", "positive")
            probs = [float(c) for c in cells[3:6]]
            assert abs(sum(probs) - 1) < 2e-3 and cells[2] == ("negative", "neutral", "positive")[probs.index(max(probs))]
