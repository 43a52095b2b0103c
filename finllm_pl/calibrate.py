"""`python -m finllm_pl calibrate --config C --ckpt_path ADAPTER --data.val_path LABELLED.jsonl [--kind vector]`:
fit a calibration for an existing adapter (or merged model folder) on a labelled file and save it beside it.

fit does this at its end when it has a validation set (model.calibration); this command is for an adapter trained
without one, or to calibrate for the data it will label (rows like it, with gold labels: never the test set). It
runs `validate` (the adapter's own label scores, any earlier calibration set aside), fits temperature or vector
scaling on them, writes `calibration.json` into the folder (validate and predict apply it from then on) and a
reliability diagram beside validate's report, and prints the ECE and Brier score before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from .errors import ConfigError, FinLLMError


def main(argv: Optional[list[str]] = None, prog: str = "python -m finllm_pl calibrate") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Fit a calibration for an adapter (or merged model folder) on "
                                "a labelled file and save it beside it (calibration.json).",
                                epilog="Every other option is validate's (e.g. --data.eval_batch_size 64).")
    p.add_argument("--ckpt_path", required=True, help="the adapter folder (or merged model folder) to calibrate")
    p.add_argument("--kind", default="temperature", choices=["temperature", "vector"],
                   help="temperature: one number, labels unchanged; vector: a scale and bias per label")
    a, rest = p.parse_known_args(argv)
    try:
        folder = Path(a.ckpt_path)
        if not folder.is_dir() or not ((folder / "adapter_config.json").exists() or (folder / "config.json").exists()):
            raise ConfigError(f"--ckpt_path {a.ckpt_path}: calibrate writes into an adapter or model folder; give the "
                              "folder fit exported (checkpoints/<run>/adapter) or `export` a .ckpt first")
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"--ckpt_path {a.ckpt_path}: folder is not writable; copy it somewhere you can write")
        from .__main__ import cli_main
        from .calibration import Calibration, write_reliability_png

        cli = cli_main(["validate", *rest, "--ckpt_path", str(folder), "--model.use_calibration", "false"])
        found = cli.model.last_validation
        if found is None:
            raise ConfigError("data.val_path has no rows with a gold label among data.labels: nothing to calibrate on")
        scores, gold = found
        labels = list(cli.model.hparams.labels)
        calibration = Calibration.fit(scores, gold, a.kind, source=f"{cli.datamodule.hparams.val_path}, {len(gold)} "
                                      "rows", label_names=labels)
        calibration.save(folder)
        png = Path(cli.trainer.default_root_dir if not cli.trainer.loggers else cli.trainer.loggers[0].log_dir,
                   "calibration_reliability.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        write_reliability_png(png, calibration.apply(scores).exp(), gold, title=f"after {a.kind} scaling")
    except FinLLMError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    b, after = calibration.before, calibration.after
    print(f"calibration ({a.kind}) on {len(gold)} rows: ECE {b['ece']:.4f} -> {after['ece']:.4f}, Brier "
          f"{b['brier']:.4f} -> {after['brier']:.4f} -> {folder / 'calibration.json'} (reliability: {png})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
