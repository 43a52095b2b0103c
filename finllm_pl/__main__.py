"""`python -m finllm_pl <command> ...` (installed as `finllm` too): the command line.

Commands, each one line in `--help` (COMMANDS and PLAIN_COMMANDS below):
  - fit / validate / predict: LightningCLI with YAML configs (configs/); `<command> --help` lists every option,
    `<command> --config <cfg> --print_config` prints the resolved config with each option's documentation;
  - export (and every command of PLAIN_COMMANDS): a plain argparse program with no Trainer (see export.py).

What this file adds to a plain LightningCLI:
  - links: model.model_name_or_path -> data.tokenizer, model.trust_remote_code -> data.trust_remote_code,
    data.labels -> model.labels (each value is set once, in one place);
  - a `checkpoint` section (ModelCheckpoint: every N optimizer steps + last) and crash-safe checkpoint files;
  - precision chosen for the hardware when the config leaves it unset (bf16-mixed / 16-mixed / 32-true);
  - `--ckpt_path` may also be an adapter folder or a merged model folder (what `export` writes);
  - user errors (bad data, bad config key, missing model, corrupted checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any, Optional


class _DropLines(logging.Filter):
    def __init__(self, says) -> None:
        super().__init__()
        self.says = says

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.says(record.getMessage())


# Log lines that are false or useless to a user of this CLI, each dropped by a filter on the one logger that says
# it (and only that line): installed before the imports below, since bitsandbytes speaks when it is imported.
FALSE_LOG_LINES = {
    # Lightning's advertisements for its cloud products (litlogger, litmodels), on every run
    "lightning.pytorch.utilities.rank_zero": lambda m: m.startswith("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud"),
    # bitsandbytes on AVX512-BF16 CPUs with the `kernels` package and the hub offline: it falls back to its own
    # kernel (harmless), and the kernel's lookup says it skipped a check it cannot make offline
    "bitsandbytes.backends.cpu.ops": lambda m: m.startswith("Failed to load CPU gemm_4bit_forward from kernels-"
                                                            "community") and "offline mode" in m,
    "kernels._internals.hf_hub": lambda m: m.startswith("Skipping publisher trust check for 'kernels-community/"
                                                        "quantization-bitsandbytes' because Hugging Face Hub is in "
                                                        "offline mode"),
}
for _name, _says in FALSE_LOG_LINES.items():
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropLines) for f in _logger.filters):
        _logger.addFilter(_DropLines(_says))

import torch  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from .callbacks import (AdapterExport, AtomicCheckpointIO, RunConfig, RunLogger, StepCheckpoint, ValidationReport,
                        check_adapter_matches, check_writable_dir, load_checkpoint_file)  # noqa: E402
from .data import InstructionDataModule  # noqa: E402
from .errors import ConfigError, FinLLMError, ModelError  # noqa: E402
from .module import FinLLM  # noqa: E402

SPECIAL_CKPT = ("last", "best", "hpc", "registry")
PROG = "python -m finllm_pl"
DESCRIPTION = ("QLoRA-tune a causal LLM for financial sentiment (negative / neutral / positive) and label files "
               "with it.")
# The commands `--help` lists, in this order, one line each (at most 54 characters: one line of --help). These
# three run through LightningCLI (a Trainer).
COMMANDS = {
    "fit": "train a LoRA adapter (QLoRA) on data.train_path",
    "validate": "loss, accuracy and F1 of a checkpoint or adapter",
    "predict": "label a file with a checkpoint, adapter or model",
}
# Plain argparse commands (no Trainer), listed after COMMANDS: name -> (module, one help line, at most 54 characters
# so that it fits on one line of --help). The module's `main(argv, prog)` (or `main(argv)`) parses `argv` and returns
# the exit status: adding a command is one line here.
PLAIN_COMMANDS = {
    "export": ("finllm_pl.export", "write a deployable adapter or merged model folder"),
    "calibrate": ("finllm_pl.calibrate", "fit an adapter's calibration on a labelled file"),
}


def program_name() -> str:
    """What the usage lines call this program: `finllm` when run as the console script, else `python -m finllm_pl`."""
    return "finllm" if os.path.basename(sys.argv[0] or "") == "finllm" else PROG


# Warnings that are false or useless here, each matched by its own text (Python's filter matches the start of the
# message). Installed by every cli_main call: a filter set once at import is lost in a caller that resets the
# filters, as pytest does for each test.
FALSE_WARNINGS = [
    # our checkpoints are taken right after an optimizer step, on purpose (StepCheckpoint); Lightning's text
    # goes on with an 11-line example of saving the pre-optimization state
    re.escape("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization "
              "state was saved."),
    # the DataModule's state_dict / load_state_dict make a mid-epoch resume exact (tests/test_training.py)
    re.escape("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
              "resumable."),
    # predict's writer does not use batch indices (it writes the rows each batch carries)
    re.escape("Couldn't infer the batch indices fetched from your dataloader: `PredictLoader`"),
    # deprecations inside transformers, Lightning and Lightning's calls into jsonargparse, not in this project's code
    ".*is_gradient_checkpointing.*is deprecated", ".*isinstance\\(treespec, LeafSpec\\)",
    "\\s*skip_none parameter was deprecated",
]


def quiet_false_warnings() -> None:
    for pattern in FALSE_WARNINGS:  # (filterwarnings replaces an identical filter: calling again adds none)
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning if pattern[0] not in ".\\" else Warning)


quiet_false_warnings()


class _Parser(LightningArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo like --model.learning_rat must not silently match
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None):  # one line, not a usage wall
        first = " ".join(str(message).split())
        sys.stderr.write(f"error: {first[:400]} (see `{program_name()} <command> --help` for every option)\n")
        sys.exit(2)

    def dump(self, cfg=None, *args, **kwargs) -> str:
        """`--print_config` prints every option with its documentation, as YAML comments (jsonargparse's own
        `comments` flag needs ruamel.yaml); every other dump (the config.yaml a run saves) stays plain."""
        if "skip_none" in kwargs:  # (Lightning still passes jsonargparse's old name; said here, its warning would
            kwargs["skip_unset"] = kwargs.pop("skip_none")  # point at this module, __main__, where Python shows it)
        text = super().dump(cfg, *args, **kwargs)
        root = self
        while hasattr(root, "parent_parser"):
            root = root.parent_parser
        if hasattr(root, "print_config") and kwargs.get("format", "parser_mode") in ("parser_mode", "yaml"):
            text = documented_yaml(text, self)
        return text


# What each section of a config is (the classes' docstrings say it for the options, not for the sections).
SECTION_DOCS = {
    "seed_everything": None,
    "trainer": "Lightning Trainer: devices, precision, run length, validation and logging cadence "
               "(https://lightning.ai/docs/pytorch/stable/common/trainer.html)",
    "model": "FinLLM (finllm_pl/module.py): base model, quantization, LoRA, optimizer and LR schedule, "
             "accumulation, execution backend, labeling",
    "data": "InstructionDataModule (finllm_pl/data.py): files, prompt format, labels, lengths, batch sizes, "
            "predict's input and output",
    "checkpoint": "ModelCheckpoint: a checkpoint every N optimizer steps and last.ckpt (adapter-only, a few MB)",
}


def documented_yaml(text: str, parser) -> str:
    """`text` (a YAML mapping) with each key's help from `parser` as `# ...` lines above it, wrapped to 110
    columns. The keys are found by PyYAML's own parser (never inside a multi-line string)."""
    import textwrap

    import yaml

    helps = {a.dest: " ".join(str(a.help).split()) for a in parser._actions
             if a.help and a.help != "==SUPPRESS==" and a.dest and not a.dest.endswith(".help")
             and type(a).__name__ != "_ActionConfigLoad"}
    helps.update({k: v for k, v in SECTION_DOCS.items() if v and k not in helps})
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return text
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, help)

    def walk(node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{path}.{key.value}" if path else str(key.value)
                if name in helps:
                    comments[key.start_mark.line] = (key.start_mark.column, helps[name])
                walk(value, name)

    walk(root, "")
    out = []
    for i, line in enumerate(text.splitlines()):
        if i in comments:
            col, doc = comments[i]
            out += textwrap.wrap(doc, 110, initial_indent=" " * col + "# ", subsequent_indent=" " * col + "# ",
                                 break_on_hyphens=False)
        out.append(line)
    return "\n".join(out) + "\n"


class FinLLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate, predict: Lightning's `test` needs a test_step, which this model has no use for."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in COMMANDS}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        for action in parser._actions:
            if "--print_config" in action.option_strings:
                action.help = ("Print the resolved config as YAML, every option with its documentation as "
                               "comments, and exit; e.g. `fit --config <cfg> --print_config > my.yaml`. Flags "
                               "(=flag,...): skip_default, skip_unset.")
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's, with our help lines, and the plain commands listed too (main() runs them, not this parser)."""
        from lightning.pytorch import Trainer

        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands(
            title="commands", description=f"`{program_name()} <command> --help` for a command's options.")
        for name, line in COMMANDS.items():
            sub_kwargs = {"description": line[0].upper() + line[1:] + ".", **kwargs.get(name, {})}
            sub = self._prepare_subcommand_parser(Trainer, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=line)
            sub.prog = f"{program_name()} {name}"  # (jsonargparse's "[options]" in between: none are needed there)
        for name, (_, line) in PLAIN_COMMANDS.items():
            subcommands.add_subcommand(name, self.parser_class(description=line), help=line)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer", apply_on="parse")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code", apply_on="parse")
        parser.link_arguments("data.labels", "model.labels", apply_on="parse")
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.dirpath": "checkpoints/run",
            "checkpoint.filename": "{step:06d}",
            "checkpoint.every_n_train_steps": 1000,
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": -1,
        })

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._command_line = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _explicit_model_settings(self, sub: str) -> dict[str, Any]:
        """The model settings given on the command line (`--model.x v` or `--model.x=v`), as parsed."""
        keys = {a.split("=", 1)[0][len("--model."):] for a in self._command_line if a.startswith("--model.")}
        return {k: self.config[sub].model[k] for k in keys if k in self.config[sub].model}

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and os.path.isdir(ckpt):  # an exported adapter folder, or a merged model folder
            if os.path.exists(os.path.join(ckpt, "adapter_config.json")):
                self.config[f"{sub}.model.adapter_path"] = ckpt
            elif os.path.exists(os.path.join(ckpt, "config.json")):
                # A merged model is a base model of its own; the tokenizer link was resolved at parse time. It labels
                # as it was saved: 4-bit as its quantization config says, otherwise unquantized unless this command
                # line asks for a quantization (the config's model.quantization is the training run's, for its base).
                self.config[f"{sub}.model.model_name_or_path"] = ckpt
                self.config[f"{sub}.data.tokenizer"] = ckpt
                self.config[f"{sub}.model.adapter_path"] = None
                saved = saved_quantization(ckpt)
                asked = self._explicit_model_settings(sub).get("quantization")
                if saved and asked not in (None, saved):
                    raise ConfigError(f"model.quantization={asked}: {ckpt} is saved {saved} (4-bit, its config.json); "
                                      "leave model.quantization out, or export the merged model without --quantize")
                self.config[sub].model.quantization = saved or asked or "none"
                if saved:
                    # ours, derived from the folder itself: transformers' "the model's quantization_config will be
                    # used" says nothing then
                    warnings.filterwarnings("ignore", message=re.escape(
                        "You passed `quantization_config` or equivalent parameters to `from_pretrained` but the model "
                        "you're loading already has a `quantization_config` attribute."), category=UserWarning)
            else:
                raise ModelError(f"{ckpt}: folder is neither an adapter (adapter_config.json) nor a model "
                                 "(config.json); give a .ckpt, the adapter folder fit exported or an exported model")
            self.config[f"{sub}.ckpt_path"] = None
            return
        loaded = None
        if ckpt and ckpt not in SPECIAL_CKPT:
            loaded = load_checkpoint_file(ckpt)  # a clear error for a missing or corrupted file, before anything loads
            if sub == "fit":  # LightningCLI would silently replace this run's model settings by the checkpoint's
                check_adapter_matches(ckpt, loaded, self.config[sub].model)
        explicit = self._explicit_model_settings(sub) if sub in ("validate", "predict") and loaded else {}
        super()._parse_ckpt_path()  # (a .ckpt's saved model settings replace the config's)
        if explicit:  # ... but what this command line says explicitly wins (e.g. --model.merge_for_labeling true)
            for k, v in explicit.items():
                self.config[sub].model[k] = v
            check_adapter_matches(ckpt, loaded, self.config[sub].model)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg.trainer.get("precision") is None:
            accel = str(cfg.trainer.get("accelerator") or "auto")
            gpu = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
            cfg.trainer.precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if gpu else "32-true"
        # Our batch samplers shard by rank themselves (length-grouped, resumable); Lightning must not wrap them.
        cfg.trainer.use_distributed_sampler = False
        if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError("trainer.accumulate_grad_batches: use model.accumulate_grad_batches (manual optimization)")
        if cfg.trainer.get("gradient_clip_val"):
            raise ConfigError("trainer.gradient_clip_val: use model.gradient_clip_val (manual optimization)")
        check_model_settings(cfg.model)

    def instantiate_trainer(self, **kwargs):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins = [AtomicCheckpointIO(), *plugins]  # crash-safe checkpoint files unless the user brings an IO
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        root = trainer_cfg.get("default_root_dir") or os.getcwd()
        self.eval_dir = eval_dir(root) if self.subcommand == "validate" else None
        if trainer_cfg.get("logger") in (None, True):  # Lightning's default logger, in this project's layout
            kwargs["logger"] = self._default_logger(root)
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        for cb in trainer.callbacks:
            if isinstance(cb, ValidationReport) and self.eval_dir:
                cb.out_dir = self.eval_dir
        return trainer

    def _default_logger(self, root: str):
        """fit: TensorBoard in <root>/lightning_logs/version_N (N a new number each run, resumes included);
        validate: <root>/eval/validate-<time>/ (its report, scalars and config); predict: none (its outputs are the
        labels and metrics files). No `hp_metric = -1` placeholder anywhere."""
        if self.subcommand == "predict":
            return False
        if self.subcommand == "validate":
            return RunLogger(save_dir=os.path.dirname(self.eval_dir), name="", version=os.path.basename(self.eval_dir))
        from lightning.fabric.plugins.environments import SLURMEnvironment

        return RunLogger(save_dir=root, version=SLURMEnvironment.job_id())

    def before_fit(self) -> None:
        cb = self.trainer.checkpoint_callback
        if cb is not None and cb.dirpath:  # before hours of training, not at the first save
            check_writable_dir(str(cb.dirpath), "checkpoint.dirpath")

    def _check_prompt_format(self) -> None:
        """An adapter must be used with the prompt format it was trained with."""
        from .model import read_prompt_format

        hp = self.model.hparams
        folder = hp.adapter_path or (hp.model_name_or_path if os.path.isdir(hp.model_name_or_path) else None)
        saved = read_prompt_format(folder) if folder else None  # adapters and merged models carry it
        if not saved:
            return
        adapter = folder
        now = self.datamodule.build_formatter().describe()
        for key in ("style", "think", "system_prompt"):
            if saved.get(key) != now.get(key):
                raise ConfigError(f"data.{'prompt_style' if key == 'style' else key}: the adapter {adapter} was trained "
                                  f"with {key}={saved.get(key)!r}, this run uses {now.get(key)!r}; set it to match")
        if saved.get("labels") and list(saved["labels"]) != list(self.datamodule.hparams.labels):
            raise ConfigError(f"data.labels: the adapter was trained with {saved['labels']}; set data.labels to match")

    def before_validate(self) -> None:
        self._check_prompt_format()

    def before_predict(self) -> None:
        from .predict import PredictionWriter, check_input, check_output_path, model_identity, plan_output

        self._check_prompt_format()
        self.config_init["predict"]["return_predictions"] = False  # rows go to the file; memory stays bounded
        self.datamodule.predict_model = model_identity(self.model.hparams, self.config_init["predict"].get("ckpt_path"),
                                                       self.trainer.precision)
        # The trainer knows its world size from its construction on; the datamodule is attached to it only inside
        # trainer.predict, so it is told the world here (from its own trainer, none yet, it would plan 1 process).
        output, expect = self.datamodule.predict_job(self.trainer.world_size)
        hp = self.datamodule.hparams
        check_output_path(output, probe=False)  # (a folder, or no folder to put it in)
        # A finished output of this same job: nothing to do. Another input's output: replaced only with data.overwrite.
        action, line = plan_output(output, expect, hp.predict_path, hp.overwrite)
        if line and self.trainer.global_rank == 0:
            print(line, file=sys.stderr)
        self._predict_done = action == "done"
        if self._predict_done:
            return
        check_output_path(output)  # writable: now, not after the model has loaded
        # Every row is read (and checked) once before any is labeled (and the first gold label outside the set found)
        outside_at = check_input(hp.predict_path, hp.instruction, hp.text_column, expect["keep_fields"], hp.labels)
        self.trainer.callbacks.append(PredictionWriter(output, hp.labels, expect, input_path=hp.predict_path,
                                                       outside_at=outside_at))

    def predict(self, **kwargs) -> None:  # (LightningCLI runs this for `predict`, in place of trainer.predict)
        if not getattr(self, "_predict_done", False):
            self.trainer.predict(**kwargs)


def saved_quantization(folder: str) -> Optional[str]:
    """nf4 / fp4 for a model folder saved 4-bit by bitsandbytes (its config.json's quantization_config), else None."""
    import json

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            q = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return q.get("bnb_4bit_quant_type", "fp4") if q.get("load_in_4bit") else None


def eval_dir(root: str) -> str:
    """validate's folder: <root>/eval/validate-<date>-<time> (-2, -3, ... when one of that second exists)."""
    import time

    base = os.path.join(root, "eval", f"validate-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 2
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


def check_model_settings(m) -> None:
    """Model settings that would otherwise fail only after the data was read and the model loaded (minutes on a
    real model), checked from the config alone: LoRA's shape, the base model and the adapter folder, and the LoRA
    targets against the model's config.json (its modules built on the meta device: no weights read)."""
    from . import model as hf

    for bad, message in ((m.lora_r < 1, f"model.lora_r must be >= 1, got {m.lora_r}"),
                         (m.lora_alpha <= 0, f"model.lora_alpha must be > 0, got {m.lora_alpha}"),
                         (not 0 <= m.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {m.lora_dropout}"),
                         (not m.lora_target_modules, "model.lora_target_modules is empty; name the linear layers "
                                                     "LoRA adapts, e.g. [q_proj, k_proj, v_proj, o_proj]")):
        if bad:
            raise ConfigError(message)
    if m.adapter_path:
        if not os.path.isdir(m.adapter_path):
            raise ConfigError(f"model.adapter_path={m.adapter_path}: no such folder; give the adapter folder fit "
                              "exported (<run>/adapter)")
        if not os.path.isfile(os.path.join(m.adapter_path, "adapter_config.json")):
            raise ConfigError(f"model.adapter_path={m.adapter_path}: not an adapter folder (no adapter_config.json); "
                              "give the adapter folder fit exported (<run>/adapter)")
    name = m.model_name_or_path
    if name.startswith("builtin:"):
        from .assets import BUILTINS

        if name.split(":", 1)[1] not in BUILTINS:
            raise ModelError(f"model.model_name_or_path={name!r}: unknown built-in model; known: "
                             + ", ".join(f"builtin:{k}" for k in sorted(BUILTINS)))
    folder = hf.resolve_model_path(name)  # a missing folder, or one without config.json: a ModelError here
    if m.adapter_path or m.trust_remote_code:
        return  # (an adapter brings its own targets; remote code is not run to look)
    available = _linear_layers(folder)
    missing = [t for t in m.lora_target_modules if available is not None and t not in available]
    if missing:
        raise ModelError(f"model.lora_target_modules: {missing} not in this model; its linear layers are: "
                         f"{', '.join(available)}")


def _linear_layers(folder: str) -> Optional[list[str]]:
    """The LoRA-targetable linear layers of the model whose config.json is in `folder` (or in the hub cache for a
    hub id), its modules built on the meta device; None when that cannot be known cheaply."""
    from . import model as hf

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(folder, "config.json")
        except Exception:  # noqa: BLE001  (not a valid hub id: the load will say so)
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(os.path.dirname(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return hf.linear_module_names(model)
    except Exception:  # noqa: BLE001  (an architecture this transformers cannot build: the load will say so)
        return None


def main(argv: Optional[list[str]] = None) -> None:
    """The program: a PLAIN_COMMANDS command runs its own parser (no Trainer); everything else is LightningCLI."""
    cli_main(argv)


def _run_plain(name: str, args: list[str]) -> int:
    import importlib
    import inspect

    fn = importlib.import_module(PLAIN_COMMANDS[name][0]).main
    prog = f"{program_name()} {name}"
    return fn(args, prog=prog) if "prog" in inspect.signature(fn).parameters else fn(args)


def _check_config_files(args: list[str]) -> None:
    """A config file that is not valid YAML: name the file and line (the parser alone says '<unicode string>')."""
    import yaml

    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    yaml.safe_load(f)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark else path
                why = " ".join(str(getattr(e, "problem", None) or e).split())
                raise ConfigError(f"{where}: not a valid YAML config ({why}); fix the file") from None


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> FinLLMCLI:
    """Run the CLI (tests call this in-process). `run=False` parses and builds the objects without running."""
    argv = sys.argv[1:] if args is None else list(args)
    quiet_false_warnings()
    if argv[:1] and argv[0] in PLAIN_COMMANDS:
        sys.exit(_run_plain(argv[0], argv[1:]))
    try:
        _check_config_files(argv)
        return FinLLMCLI(
            FinLLM,
            InstructionDataModule,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            seed_everything_default=42,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [AdapterExport(), ValidationReport()]},
            subclass_mode_model=False,
            subclass_mode_data=False,
            parser_class=_Parser,
            parser_kwargs={"prog": program_name(), "description": DESCRIPTION},
        )
    except FinLLMError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
