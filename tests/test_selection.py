"""The end of fit: calibration fitted on the validation set and saved beside the adapter, the `calibrate` command for
an adapter, the best checkpoint by a label metric exported (saying which step), early stopping on that metric."""

import json
import logging
from pathlib import Path

import pytest
import torch

from finllm_pl.__main__ import cli_main, main
from finllm_pl.calibration import Calibration

BASE = ["--config", "configs/smoke.yaml", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "6",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--data.batch_size", "4", "--model.warmup_steps", "2", "--checkpoint.every_n_train_steps", "3"]


def _fit(args):
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def test_fit_calibrates_on_the_validation_set_and_predict_applies_it(workdir):
    """calibration.json beside the adapter: a temperature fitted on the last step's validation scores (it lowers
    the validation NLL, as fitted), with the rows' label prior; validate then reports the calibrated ECE."""
    cli = _fit(BASE)
    cal = Calibration.load("checkpoints/smoke/adapter")
    assert cal is not None and cal.kind == "temperature" and cal.labels == ["negative", "neutral", "positive"]
    assert cal.fitted_on["rows"] == 48 and cal.fitted_on["source"].endswith(f"step {cli.trainer.global_step}")
    assert cal.after["nll"] <= cal.before["nll"] and sum(cal.prior) == pytest.approx(1.0)
    assert Path(cli.trainer.default_root_dir, "calibration_reliability.png").stat().st_size > 1000
    fresh = cli_main(["validate", *BASE, "--ckpt_path", "checkpoints/smoke/adapter"])
    assert fresh.model.calibration is not None
    calibrated_ece = fresh.model.last_report["ece"]
    assert calibrated_ece == pytest.approx(cal.after["ece"], abs=1e-4)  # the same rows, the same weights
    none = _fit(BASE + ["--model.calibration", "none", "--checkpoint.dirpath", "ck_none"])
    assert none.trainer.global_step and not Path("ck_none/adapter/calibration.json").exists()


def test_the_calibrate_command_writes_a_calibration_for_an_adapter(workdir, capsys):
    _fit(BASE + ["--model.calibration", "none"])
    assert not Path("checkpoints/smoke/adapter/calibration.json").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--config", "configs/smoke.yaml", "--ckpt_path", "checkpoints/smoke/adapter", "--kind",
              "vector", "--data.train_path", "null", "--data.val_path", "data/sample.jsonl",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert exit_.value.code in (0, None)
    cal = Calibration.load("checkpoints/smoke/adapter")
    assert cal.kind == "vector" and cal.fitted_on["rows"] == 240 and cal.after["nll"] <= cal.before["nll"]
    assert "calibration (vector) on 240 rows: ECE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--config", "configs/smoke.yaml", "--ckpt_path", "checkpoints/smoke/last.ckpt"])
    assert "calibrate writes into an adapter or model folder" in capsys.readouterr().err


def test_the_best_checkpoint_by_a_label_metric_is_the_exported_adapter(workdir, caplog):
    """checkpoint.monitor val/f1_weighted (mode max): the adapter fit exports holds the best step's LoRA weights
    (not the last one's), the prompt record and the log name that step."""
    args = BASE + ["--checkpoint.monitor", "val/f1_weighted", "--checkpoint.mode", "max", "--model.learning_rate",
                   "0.05"]
    with caplog.at_level(logging.INFO):
        cli = _fit(args)
    cb = cli.trainer.checkpoint_callback
    best = torch.load(cb.best_model_path, weights_only=True)
    record = json.loads(Path("checkpoints/smoke/adapter/prompt_format.json").read_text())["checkpoint"]
    assert record["step"] == best["global_step"] and record["monitor"] == "val/f1_weighted"
    assert record["value"] == pytest.approx(float(cb.best_model_score))
    from safetensors.torch import load_file

    exported = load_file("checkpoints/smoke/adapter/adapter_model.safetensors")
    for k, v in best["state_dict"].items():
        assert torch.equal(exported[k.removeprefix("model.").replace(".default", "")], v), k
    if best["global_step"] != cli.trainer.global_step:  # (the case the export must get right)
        assert f"(the best checkpoint: step {best['global_step']}" in caplog.text


def test_early_stopping_on_the_label_metric_stops_and_saves_the_final_state(workdir):
    """Lightning's EarlyStopping on val/f1_weighted works with the manual optimization: the run stops before its
    last epoch once the metric has not improved for `patience` validations, and last.ckpt is that step."""
    args = BASE + ["--trainer.max_epochs", "20", "--model.learning_rate", "1e-6", "--trainer.callbacks+=EarlyStopping",
                   "--trainer.callbacks.monitor=val/f1_weighted", "--trainer.callbacks.mode=max",
                   "--trainer.callbacks.patience=1"]
    cli = _fit(args)
    assert cli.trainer.current_epoch < 19 and cli.trainer.should_stop
    last = torch.load("checkpoints/smoke/last.ckpt", weights_only=True)
    assert last["global_step"] == cli.trainer.global_step
