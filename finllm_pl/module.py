"""FinLLM: the LightningModule. A 4-bit (or plain) base + LoRA, trained with manual optimization; this file tells a
run's story: build the model and its execution backend, take a step, validate, label, save and resume.

Why manual optimization: the loss is normalised by the number of supervised tokens of the *whole* accumulation
window (not averaged per micro-batch, which would over-weight short batches), a non-finite loss or gradient skips
the update instead of corrupting the adapter, and every count (warmup, decay, checkpoint interval) is in optimizer
steps (a skipped one counts, as fp16 loss scaling's skipped steps do).

A step: each micro-batch backpropagates its *summed* token loss (the backend computes it: plain HF + peft, or the fast
components); at the window's end the gradients are divided by the window's token count (summed over ranks), clipped,
and the fused AdamW steps, all queued on the GPU without reading anything back (the fault check is the optimizer's
own `found_inf` skip; the host learns the outcome a step later). Windows end at `(batch_idx + 1) % accumulate == 0`
or at the epoch's last batch.

Checkpoints hold only the trainable (LoRA) tensors, optimizer, scheduler, loop and data position, RNG state and, when
saved mid-window, what every rank accumulated so far: a resumed run continues bit-for-bit on CPU.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from . import backend as backends
from . import fsdp
from . import model as hf
from .calibration import Calibration, brier_score, expected_calibration_error
from .errors import ConfigError, FinLLMError, ModelError
from .metrics import label_metrics, summarize
from .prompts import DEFAULT_LABELS
from .schedule import WarmupOverflow, resolve_schedule

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class NonFiniteError(FinLLMError):
    """Too many non-finite steps in a row."""


class FinLLM(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        quantization: hf.Quantization = "nf4",
        compute_dtype: hf.DType = "auto",
        attn_implementation: Optional[str] = None,
        trust_remote_code: bool = False,
        adapter_path: Optional[str] = None,
        lora_r: int = 4,
        lora_alpha: int = 8,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] = list(DEFAULT_TARGETS),
        use_dora: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        warmup_overflow: WarmupOverflow = "clamp",
        lr_decay: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        accumulate_grad_batches: int = 8,
        gradient_clip_val: float = 1.0,
        gradient_checkpointing: bool = False,
        max_nonfinite_steps: int = 5,
        backend: backends.BackendName = "fast",
        fast_skip: list[str] = [],
        chunk_tokens: Optional[int] = None,
        merge_for_labeling: bool = False,
        calibration: Literal["temperature", "vector", "none"] = "temperature",
        use_calibration: bool = True,
        prior_shift: Union[Literal["none", "em"], list[float]] = "none",
        labels: list[str] = list(DEFAULT_LABELS),
        predict_mode: Literal["score", "generate"] = "score",
        max_new_tokens: int = 16,
    ) -> None:
        """
        Args:
            model_name_or_path: hub id, local model folder, or builtin:tiny-deepseek (built offline).
            quantization: nf4 / fp4 (4-bit bitsandbytes, double quant) or none (plain weights in compute_dtype).
            compute_dtype: auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU), bfloat16, float16, float32.
            attn_implementation: null (the model's own choice: sdpa for most, eager for Gemma2), sdpa, eager, or
                flash_attention_2.
            trust_remote_code: run code shipped in the model folder (off: only built-in architectures load).
            adapter_path: a saved adapter folder to start from (fit) or to label with (validate/predict).
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = alpha / r).
            lora_dropout: dropout on the LoRA input.
            lora_target_modules: linear layers that get LoRA (short names, e.g. q_proj).
            use_dora: DoRA (peft): LoRA on the direction plus a learned magnitude per output; slower steps.
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warmup length in optimizer steps.
            warmup_overflow: policy when warmup_steps >= the run: clamp (to 10% of the run), keep, error.
            lr_decay: decay after warmup: linear or cosine to min_lr_ratio, or constant.
            min_lr_ratio: final LR as a fraction of the peak.
            accumulate_grad_batches: micro-batches per optimizer step.
            gradient_clip_val: max global grad norm (0 = no clipping).
            gradient_checkpointing: recompute activations in backward (less memory, slower steps).
            max_nonfinite_steps: stop the run after this many non-finite steps in a row (each one is skipped).
            backend: how steps and label scores are computed: fast (fewer, fused kernels; each part is checked
                against plain on a stand-in of this model at the start and switched off if it differs) or plain
                (Hugging Face + peft as they are).
            fast_skip: fast components not to use, e.g. [dequantize] to save memory (model.backend fast lists them).
            chunk_tokens: run a training micro-batch of more padded tokens than this as row chunks, gradients
                summed: the same step with its activation memory capped. null = whole micro-batches.
            merge_for_labeling: validate/predict: fold the adapter into the base weights first (faster; scores
                equal up to bf16 rounding). Needs full-precision base weights (quantization none, or fast's
                dequantize).
            calibration: fit at the end of fit, on the validation set's label scores, and saved beside the adapter
                (calibration.json): temperature (one number; labels unchanged), vector (a scale and bias per label;
                can move labels), or none.
            use_calibration: validate/predict apply the adapter's calibration.json when it has one.
            prior_shift: predict: re-weight every row's probabilities to the label mix of the file it labels, none,
                em (estimated from the file itself, no labels needed; Saerens et al. 2002), or a prior you give
                ([0.2, 0.5, 0.3], in data.labels order).
            labels: the label set scored by validation and predict (linked to data.labels).
            predict_mode: score (the label with the highest log P(label + EOS | prompt); always a valid label, with
                probabilities) or generate (greedy free text, parsed; no single label named -> label null).
            max_new_tokens: longest generated answer in predict_mode=generate.
        """
        super().__init__()
        for bad, message in ((accumulate_grad_batches < 1, f"accumulate_grad_batches must be >= 1, got "
                                                           f"{accumulate_grad_batches}"),
                             (max_new_tokens < 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
                             (learning_rate <= 0, f"learning_rate must be > 0, got {learning_rate}"),
                             (chunk_tokens is not None and chunk_tokens < 1,
                              f"chunk_tokens must be >= 1 or null, got {chunk_tokens}"),
                             (bool(set(fast_skip) - set(backends.COMPONENTS)),
                              f"fast_skip: unknown component(s) {sorted(set(fast_skip) - set(backends.COMPONENTS))}; "
                              f"the components are {list(backends.COMPONENTS)}"),
                             (merge_for_labeling and quantization != "none" and (backend != "fast" or "dequantize"
                                                                                   in fast_skip),
                              "merge_for_labeling folds the adapter into full-precision base weights: use "
                              "model.backend fast (it holds the base dequantized) or model.quantization none"),
                             (isinstance(prior_shift, list) and (len(prior_shift) != len(labels) or min(prior_shift) <= 0
                                                                 or abs(sum(prior_shift) - 1) > 1e-3),
                              f"prior_shift: a prior has one positive share per label ({len(labels)}), summing to 1; "
                              f"got {prior_shift}")):
            if bad:
                raise ConfigError(f"model.{message}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks its keys
        self.model = self.tokenizer = self.backend = self.schedule = None
        self._reset_window()
        self._nonfinite_in_row = self._nonfinite_total = 0
        self._nonfinite_count: Any = 0  # the same total as a device tensor (logged every step without a sync)
        self._in_flight = None  # (step, event, seconds, record) of the optimizer step not read back yet
        self._shown: dict[str, float] = {}  # progress bar values of the last step read back
        self._restored: dict[str, Any] = {}  # a checkpoint's RNG and window, until the first step
        self._resumed_step: Optional[int] = None  # the optimizer step fit resumed from
        self._merged = False
        self.calibration: Optional[Calibration] = None  # the adapter's, applied in validate/predict
        self.last_validation: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (scores, gold) of all ranks

    # -- build ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, trainer = self.hparams, self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        dtype = hf.torch_dtype(hp.compute_dtype, device)
        if device.type == "cpu":  # tiny gradients and Adam moments become denormals, 10-50x slower on x86
            torch.set_flush_denormal(True)
        fitting = trainer is None or trainer.state.fn == "fit"
        shape = backends.RunShape(hp.model_name_or_path, hp.quantization, dtype, device, hp.lora_r, hp.lora_alpha,
                                  hp.lora_target_modules, hp.attn_implementation, hp.trust_remote_code,
                                  self._max_length(), training=fitting)
        world = trainer.world_size if trainer else 1
        agree = (lambda on: trainer.strategy.reduce_boolean_decision(on, all=True)) if world > 1 else None
        sharded = fsdp.strategy_of(trainer, hp, dtype)  # FSDP-QLoRA (fsdp.py) or None; refuses what cannot work
        decision = (fsdp.plan if sharded else backends.plan)(hp.backend, shape, hp.fast_skip, world, str(
            trainer.precision) if trainer else "32-true", hp.gradient_checkpointing, agree)
        for line in decision.lines() if hp.backend == "fast" else ():
            rank_zero_info(line)
        self.decision = decision  # (what the self-check kept and why it dropped the rest: for reports)
        self.tokenizer = hf.load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        lora = {"r": hp.lora_r, "alpha": hp.lora_alpha, "dropout": hp.lora_dropout,
                "target_modules": hp.lora_target_modules, "use_dora": hp.use_dora}
        self.model = hf.build(hp.model_name_or_path, hp.quantization, dtype, device, hp.attn_implementation,
                              hp.trust_remote_code, lora, hp.adapter_path, "dequantize" in decision.on,
                              hp.gradient_checkpointing, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
                              quant_storage=sharded.quant_storage(dtype) if sharded else None)
        self.backend = backends.make(hp.backend, self.model, dtype, decision, hp.chunk_tokens)
        self.metrics = label_metrics(len(hp.labels)).to(device)
        folder = hp.adapter_path or (hp.model_name_or_path if os.path.isdir(hp.model_name_or_path) else None)
        self.calibration = Calibration.beside(folder, hp.labels) if hp.use_calibration and folder else None
        if self.calibration is not None:
            rank_zero_info(f"calibration: {folder}/calibration.json ({self.calibration.kind}) applied to label scores")
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        rank_zero_info(f"model {hp.model_name_or_path}: {n_train:,} trainable parameters, quantization="
                       f"{hp.quantization}, compute dtype={dtype}, backend {self.backend.describe()}")
        if sharded:  # FSDP: the model sharded over the ranks (after its whole size was logged), the backend on it
            self.model = sharded.shard(self.model)
            self.backend = backends.make(hp.backend, self.model, dtype, decision, hp.chunk_tokens)

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Label log-probabilities as the run reports them: the calibration's, or log_softmax of the scores."""
        if self.calibration is not None:
            return self.calibration.apply(scores).float()
        return torch.log_softmax(scores.float(), -1)

    def _max_length(self) -> int:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(dm, "hparams", {}).get("max_length", 512))

    def trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n in fsdp.trainable_shapes(self.model)}  # (one-GPU names, also when sharded)

    # -- optimization -----------------------------------------------------------------------------------------
    def total_optimizer_steps(self) -> int:
        """Optimizer steps in this run: ceil(batches per epoch / accumulation) per epoch, capped by max_steps."""
        t = self.trainer
        for key, value in (("trainer.max_steps", t.max_steps), ("trainer.max_epochs", t.max_epochs)):
            if value == 0:
                raise ConfigError(f"{key}=0: the run would train nothing; set it >= 1")
        if (t.max_epochs is None or t.max_epochs < 0) and (t.max_steps is None or t.max_steps < 0):
            raise ConfigError("set trainer.max_epochs or trainer.max_steps: the LR schedule needs the run's length")
        _ = t.estimated_stepping_batches  # makes the fit loop set up its data, so num_training_batches is known
        per_epoch = math.ceil(t.num_training_batches / self.hparams.accumulate_grad_batches)
        total = per_epoch * t.max_epochs if t.max_epochs and t.max_epochs > 0 else None
        if t.max_steps and t.max_steps > 0:
            total = min(total, t.max_steps) if total else t.max_steps
        if not total:
            raise ConfigError("set trainer.max_epochs or trainer.max_steps: the LR schedule needs the run's length")
        return total

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all LoRA tensors, and it can skip a non-finite step on the device (found_inf)
        opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=True)
        try:
            self.schedule = resolve_schedule(self.total_optimizer_steps(), hp.warmup_steps, hp.learning_rate,
                                             hp.warmup_overflow, min_lr_ratio=hp.min_lr_ratio, decay=hp.lr_decay)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rank_zero_info(f"schedule: {self.schedule.total_steps} optimizer steps, warmup {self.schedule.warmup_steps}, "
                       f"{hp.lr_decay} decay, peak lr {hp.learning_rate:g}")
        return [opt], [{"scheduler": LambdaLR(opt, self.schedule.factor), "interval": "step"}]

    @property
    def window_open(self) -> bool:
        """True between the first micro-batch of an accumulation window and its optimizer step."""
        return self._window["micro"] > 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        w = self._window
        w["t0"] = w["t0"] or time.perf_counter()
        boundary = (batch_idx + 1) % self.hparams.accumulate_grad_batches == 0 or self.trainer.is_last_batch
        # DDP syncs gradients only in the window's last backward
        loss, n = self.backend.train_step(batch, self.manual_backward,
                                          lambda last: opt.toggle_model(sync_grad=boundary and last))
        # Kept as device tensors: reading them back each micro-batch would stall the GPU twice per batch.
        w["loss"] = w["loss"] + loss.detach().double()
        w["tokens"] = w["tokens"] + n
        w["all_tokens"] = w["all_tokens"] + batch["attention_mask"].sum()
        w["micro"] += 1
        if boundary:
            self._optimizer_step(opt, sched)

    def _optimizer_step(self, opt, sched) -> None:
        """Normalise, clip, step, schedule; nothing is read back from the GPU (the host goes on with the next batch
        while the GPU works); the outcome (skipped? loss?) is read one step later by `_drain`."""
        self._drain()
        w, step = self._window, self.global_step
        totals = torch.stack([torch.as_tensor(w[k], dtype=torch.float64, device=self.device)
                              for k in ("loss", "tokens", "all_tokens")])
        loss_total, tokens, all_tokens = self.trainer.strategy.reduce(totals, reduce_op="sum").unbind()  # all ranks
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        # DDP averaged the summed-loss gradients over ranks; scale so they are d(mean token loss) of the window. A
        # non-finite loss makes the scale NaN: the gradients carry the fault to whichever check skips the step.
        scale = (self.trainer.world_size / tokens.clamp(min=1.0)).float()
        torch._foreach_mul_(grads, torch.where(torch.isfinite(loss_total), scale, torch.nan))
        grad_norm = fsdp.grad_norm(grads, self.model)  # (sharded: the squared norms of every rank's shards summed)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        # fp16: the gradients still carry the loss scale here (the fused optimizer unscales them), so the clip
        # threshold does too; inf gradients with a finite loss are the scaler's business (it skips and backs off).
        loss_scale = scaler.get_scale() if scaler is not None else 1.0
        fault = ~torch.isfinite(loss_total) if scaler is not None else ~torch.isfinite(grad_norm)
        if self.hparams.gradient_clip_val > 0:  # clip_grad_norm_'s rule on the norm already computed
            torch._foreach_mul_(grads, (self.hparams.gradient_clip_val * loss_scale / (grad_norm + 1e-6)).clamp(max=1))
        if scaler is None:  # the fused AdamW skips the update on the GPU: adapter and moments stay as they were
            opt.optimizer.found_inf = fault.float()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        opt.optimizer.__dict__.pop("found_inf", None)
        opt.zero_grad(set_to_none=True)
        sched.step()
        self.backend.weights_changed()
        self._nonfinite_count = self._nonfinite_count + fault.long()
        elapsed = max(time.perf_counter() - w["t0"], 1e-9)
        mean_loss = loss_total / tokens.clamp(min=1.0)
        logged = {"train/loss": mean_loss, "train/lr": torch.tensor(lr), "train/grad_norm": grad_norm / loss_scale,
                  "train/tokens_per_s": all_tokens / elapsed, "train/supervised_tokens": tokens,
                  "train/nonfinite_steps": self._nonfinite_count.double()}
        self.log_dict(logged, logger=False, rank_zero_only=True)  # (callback_metrics; TensorBoard just below)
        # TensorBoard at the optimizer step (Lightning's logger step counts micro-batches under manual optimization),
        # every trainer.log_every_n_steps optimizer steps and at the run's last: the values are read back then only
        if self.trainer.is_global_zero and (self.global_step % self.trainer.log_every_n_steps == 0
                                             or self.global_step == self.schedule.total_steps):
            from .callbacks import log_scalars

            log_scalars(self.loggers, logged, self.global_step)
        for name, value in self._shown.items():  # the progress bar shows the previous step's (already read back)
            self.log(name, torch.tensor(value), prog_bar=True, logger=False, rank_zero_only=True)
        # read back next step: pinned memory, so the copy does not wait for the GPU; the event says when it landed
        record = torch.empty(3, dtype=torch.float64, pin_memory=self.device.type == "cuda")
        record.copy_(torch.stack([fault.double(), mean_loss, all_tokens]), non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        self._in_flight = (step, event, elapsed, record)
        self._reset_window()

    def _drain(self, stop: bool = True) -> None:
        """The previous optimizer step's outcome, now that it is done: count, warn, show; stop after too many."""
        if self._in_flight is not None:
            step, event, elapsed, record = self._in_flight
            self._in_flight = None
            if event is not None:
                event.synchronize()
            fault, loss, all_tokens = record.tolist()
            if fault:
                self._nonfinite_in_row += 1
                self._nonfinite_total += 1
                rank_zero_warn(f"step {step}: non-finite loss or gradient; optimizer step skipped "
                               f"({self._nonfinite_in_row} in a row)")
            else:
                self._nonfinite_in_row = 0
                self._shown = {"loss": loss, "tok/s": all_tokens / elapsed}
        if stop and self._nonfinite_in_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteError(f"{self._nonfinite_in_row} optimizer steps in a row had a non-finite loss or "
                                 "gradient; stopping. They were skipped: the adapter in the last checkpoint is the one "
                                 "from before them. Lower model.learning_rate or check the data, then resume with "
                                 "--ckpt_path last")

    def _reset_window(self) -> None:
        self._window = {"loss": 0.0, "tokens": 0, "micro": 0, "t0": None, "all_tokens": 0}

    def on_train_epoch_end(self) -> None:
        self._drain()  # the epoch's last step: its skip is counted (and may stop the run) before the epoch ends

    # -- validation and labeling ----------------------------------------------------------------------------------
    def _merge_for_labeling(self) -> None:
        """Fold the adapter in (once), after any checkpoint's weights were loaded: validate/predict runs only."""
        if (self.hparams.merge_for_labeling and self.trainer.state.fn != "fit" and not self._merged
                and hasattr(self.model, "merge_adapter")):  # (an untuned base has no adapter to fold in)
            self.model.merge_adapter()
            self._merged = True
            self.backend.weights_changed()

    def on_validation_epoch_start(self) -> None:
        self._merge_for_labeling()
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._val_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with self.backend.labeling():
            loss, n = self.backend.loss(batch)
            scores = self.backend.score(batch)
        self._val += torch.stack([loss.detach().double(), n.double()])
        keep = batch["gold"] >= 0
        if keep.any():
            self.metrics.update(self.calibrated(scores).argmax(-1)[keep], batch["gold"][keep])
            self._val_rows.append((scores[keep].float(), batch["gold"][keep]))

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        val_loss = float(total[0] / total[1].clamp(min=1))
        values = self.metrics.compute()  # torchmetrics sums the states of all ranks (padding rows were never added)
        # totals over all ranks already, the same on each: sync_dist + rank_zero_only runs no collective
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True, rank_zero_only=True)
        for k in ("accuracy", "f1_macro", "f1_weighted"):
            self.log(f"val/{k}", float(values[k]), prog_bar=k == "f1_weighted", sync_dist=True, rank_zero_only=True)
        extra = {"val_loss": val_loss}
        self.last_validation = self._gather_scores()
        if self.last_validation is not None:  # how far the (calibrated) probabilities are from the frequencies
            scores, gold = self.last_validation
            probs = self.calibrated(scores).exp()
            extra.update(ece=expected_calibration_error(probs, gold), brier=brier_score(probs, gold),
                         calibrated=self.calibration is not None)
            for k in ("ece", "brier"):
                self.log(f"val/{k}", extra[k], sync_dist=True, rank_zero_only=True)
        # Lightning's way to put them at the optimizer step: a logged "step" is the logger's x value (validate: the
        # checkpoint's step)
        from .callbacks import logged_step

        self.log("step", float(logged_step(self.trainer, self)), sync_dist=True, rank_zero_only=True)
        self.last_report = summarize(values, self.hparams.labels, extra)

    @torch.no_grad()
    def validation_scores(self, loader, batches: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(label scores [N, K], gold [N]) of the first `batches` validation batches with the weights as they are
        now, all ranks' (every rank calls): what calibration at the end of fit is fitted on."""
        self.model.eval()
        self._val_rows = []
        with self.trainer.precision_plugin.val_step_context(), self.backend.labeling():
            for batch in itertools.islice(loader, batches):
                batch = self.trainer.strategy.batch_to_device(batch)
                scores = self.backend.score(batch)  # (also a padding batch: under FSDP every forward is a collective)
                keep = batch["gold"] >= 0
                if keep.any():
                    self._val_rows.append((scores[keep].float(), batch["gold"][keep]))
        return self._gather_scores()

    def _gather_scores(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(label scores [N, K], gold [N]) of every rank's counted validation rows, on the CPU (every rank calls)."""
        k = len(self.hparams.labels)
        scores = torch.cat([s for s, _ in self._val_rows]) if self._val_rows else torch.zeros(0, k, device=self.device)
        gold = torch.cat([g for _, g in self._val_rows]) if self._val_rows else torch.zeros(0, dtype=torch.long,
                                                                                               device=self.device)
        if self.trainer.world_size > 1:  # ranks hold different numbers of rows: pad to the largest, then cut
            n = self.all_gather(torch.tensor(len(gold), device=self.device)).reshape(-1)
            most = int(n.max())
            scores = torch.cat([scores, scores.new_zeros(most - len(gold), k)])
            gold = torch.cat([gold, gold.new_full((most - len(gold),), -1)])
            scores, gold = self.all_gather(scores), self.all_gather(gold)
            scores = torch.cat([scores[r, : int(n[r])] for r in range(len(n))])
            gold = torch.cat([gold[r, : int(n[r])] for r in range(len(n))])
        return (scores.cpu(), gold.cpu()) if len(gold) else None

    def on_predict_epoch_start(self) -> None:
        self._merge_for_labeling()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.hparams.predict_mode == "generate":
            return {"rows": batch["rows"], "texts": hf.generate_answers(self.model, self.tokenizer, batch["prompt_ids"],
                                                                       batch["prompt_mask"], self.hparams.max_new_tokens)}
        with self.backend.labeling():
            scores = self.calibrated(self.backend.score(batch))
        if scores.device.type != "cuda":
            return {"rows": batch["rows"], "scores": scores.cpu()}
        # Copied into pinned memory without waiting: the writer reads the scores one batch later (the event says when
        # they landed), so the GPU scores the next batch while the host writes this one's rows.
        host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return {"rows": batch["rows"], "scores": host, "ready": ready}

    # -- checkpoints: the adapter, the window in progress, the RNG ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drain(stop=False)  # the skipped-step count must be current (a stop comes at the next step)
        keys = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        hp = self.hparams
        meta = {"base_model": hp.model_name_or_path, "world_size": self.trainer.world_size,
                "lora": {"r": hp.lora_r, "alpha": hp.lora_alpha, "target_modules": list(hp.lora_target_modules)},
                "nonfinite_steps": self._nonfinite_total, "rng": {"cpu": torch.get_rng_state()}}
        if torch.cuda.is_available():
            meta["rng"]["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        if self.window_open:  # saved mid accumulation window: what every rank accumulated so far
            meta["window"] = {"ranks": self._gather_window()}
        checkpoint["finllm"] = meta

    def _gather_window(self) -> list[dict[str, Any]]:
        """Each rank's window counters and accumulated LoRA gradients (all ranks call this: on_save_checkpoint runs on
        every rank), so that a resume gives every rank back its own partial window."""
        if isinstance(self.model, fsdp.ShardedModel):  # each rank's shards of the gradients (reduced already)
            return fsdp.gather_window(self.model, self._window)
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        w = self._window
        counters = torch.stack([torch.as_tensor(w[k], dtype=torch.float64, device=self.device).reshape(())
                                for k in ("loss", "tokens", "all_tokens")] + [torch.tensor(float(w["micro"]),
                                dtype=torch.float64, device=self.device)])
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                          for _, p in params])
        world = self.trainer.world_size
        counters, flat = (self.all_gather(t).reshape(world, -1) if world > 1 else t[None] for t in (counters, flat))
        ranks = []
        for r in range(world):
            grads = {n: g.view_as(p).to(p.dtype).cpu() for (n, p), g in
                     zip(params, flat[r].split([p.numel() for _, p in params]))}
            loss, tokens, all_tokens, micro = counters[r].cpu().tolist()
            ranks.append({"loss": loss, "tokens": tokens, "all_tokens": all_tokens, "micro": int(micro), "grads": grads})
        return ranks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from .callbacks import check_adapter_matches

        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        meta = checkpoint.get("finllm")
        if meta is None:
            raise ModelError(f"{path}: not a finllm_pl checkpoint (no adapter metadata); give a .ckpt that fit wrote")
        have, want = set(checkpoint["state_dict"]), self.trainable_keys()
        shapes = fsdp.trainable_shapes(self.model)  # (whole shapes, also of sharded parameters)
        if have != want or any(checkpoint["state_dict"][k].shape != shapes[k[len("model."):]] for k in want):
            raise ModelError(
                f"{path}: checkpoint is an adapter for {meta['base_model']} with LoRA r={meta['lora']['r']} on "
                f"{meta['lora']['target_modules']}, but this run is {self.hparams.model_name_or_path} with "
                f"r={self.hparams.lora_r} on {list(self.hparams.lora_target_modules)}; use the matching config")
        check_adapter_matches(path, checkpoint, self.hparams)  # same shapes, but another base model or LoRA scale
        if self._trainer is not None and self.trainer.training and meta.get("world_size", 1) != self.trainer.world_size:
            raise ModelError(f"{path}: saved by a run on {meta['world_size']} process(es), resumed on "
                             f"{self.trainer.world_size}: the data order would change. Resume on the same number of "
                             "devices, or start a new run from the adapter with --model.adapter_path")
        if self._trainer is not None and self.trainer.training:  # (a mid-window checkpoint: the strategy that saved it)
            fsdp.check_resume(path, meta, self.model)
        self._restored = meta
        self._resumed_step = checkpoint.get("global_step")
        if self.backend is not None:
            self.backend.weights_changed()

    def on_train_start(self) -> None:
        meta, self._restored = self._restored, {}
        if self._resumed_step is not None:
            # The next step's LR is this run's schedule's, not the one saved in the optimizer's state: they differ
            # when max_epochs / max_steps was raised (the saved one is the old schedule's last, 0 for linear decay).
            opt, sched = self.optimizers(), self.lr_schedulers()
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * self.schedule.factor(self.global_step)
        if not meta:
            # The RNG stream (LoRA dropout) restarts from the run's seed at the first step, whatever setup consumed
            # before (a first run tokenizes, a second reads the cache): runs are reproducible, resumes exact.
            torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.global_rank)
            return
        self._nonfinite_total = self._nonfinite_count = meta.get("nonfinite_steps", 0)
        rng = meta.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if "window" in meta:
            window = meta["window"]
            mine = dict(window["ranks"][self.global_rank] if "ranks" in window else window)  # (older: one rank's)
            grads = mine.pop("grads")
            for n, p in self.model.named_parameters():
                if n in grads:
                    p.grad = grads[n].to(p.device, p.dtype)
            self._window = {**mine, "t0": None}

    def on_fit_end(self) -> None:
        if self._resumed_step is not None and self.global_step == self._resumed_step:
            rank_zero_info(f"{self.trainer.ckpt_path}: this run had already finished (step {self._resumed_step}); "
                           "nothing was trained. To train longer, raise trainer.max_epochs and/or trainer.max_steps")
