"""FinLLM: the LightningModule. A 4-bit (or plain) base + LoRA, trained with manual optimization.

Why manual optimization: the loss is normalised by the number of supervised tokens of the *whole* accumulation
window (not averaged per micro-batch, which would over-weight short batches), a non-finite loss or gradient skips
the update instead of corrupting the adapter, and every count (warmup, decay, checkpoint interval) is in optimizer
steps (a skipped one counts, as fp16 loss scaling's skipped steps do).

How: each micro-batch backpropagates its *summed* token loss; at the window's end the gradients are divided by
the window's token count (summed over ranks), clipped, and the fused AdamW steps, all queued on the GPU without
reading anything back (the fault check is the optimizer's own `found_inf` skip; the host learns a step later).
Windows end at `(batch_idx + 1) % accumulate == 0` or at the epoch's last batch.

Checkpoints hold only the trainable (LoRA) tensors, optimizer, scheduler, loop and data position, RNG state and,
when saved mid-window, the gradients accumulated so far: a resumed run continues bit-for-bit on CPU.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from . import model as hf
from .callbacks import check_adapter_matches
from .data import collate_prompts
from .errors import ConfigError, FinLLMError, ModelError
from .fused import fused_forwards
from .graphs import GraphedLossBackward, compiled_forwards, fast_modules, row_chunks
from .kernels import compile_in_background, fused_layer_forwards
from .metrics import label_metrics, summarize
from .prompts import DEFAULT_LABELS
from .schedule import WarmupOverflow, resolve_schedule
from .scoring import loss_sum, score_labels

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# predict compiles the norms/MLPs (model.compile_layers) only for jobs of at least this many rows per process. On an
# H100, each job in a new process with an empty compile cache (results/gpu/predict_rows_compile_by_job_size.json):
#   rows      13,173  26,346  52,692  158,076
#   compiled    9.8    12.0    19.4    50.8  s
#   plain       5.7    10.3    19.6    55.2  s
LABEL_COMPILE_MIN_ROWS = 50_000
WARM_UP_DEVICES = ("cuda",)  # predict's warm-up batch (FinLLM._start_warm_up) runs on these device types
WARM_UP_ROWS = 384  # of 16 shared + 8-40 own tokens: ~14,000 tokens after the prefix, as a real batch has
WARM_UP_VOCAB = 4096  # the stand-in's vocabulary (the real one's embedding would take 0.5 GB beside the loading)


def warm_up_batch(n_labels: int, device: torch.device) -> dict[str, Any]:
    """A made-up labeling batch shaped like real ones (WARM_UP_ROWS prompts of a 16-token shared prefix and 8-40
    own tokens, n_labels labels of 2 tokens), drawn on the host from a seeded generator of its own, whatever the
    default device (Lightning's configure_model runs under the GPU's), then moved to `device`."""
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(0)
        prefix = torch.randint(WARM_UP_VOCAB, (16,), generator=g).tolist()
        prompts = [prefix + torch.randint(WARM_UP_VOCAB, (int(n),), generator=g).tolist()
                   for n in torch.randint(8, 41, (WARM_UP_ROWS,), generator=g)]
        batch = collate_prompts(prompts, 0, torch.randint(WARM_UP_VOCAB, (n_labels, 2), generator=g).tolist())
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def labeling_forwards(decoder, fused_layers: bool) -> dict:
    """Label scoring's forwards: fused.py's attention linears and (model.fused_layers) kernels.py's norms, MLPs
    and rotary attention (which, without gradients on CUDA, folds grouped query heads: attention.py)."""
    return {**fused_forwards(decoder), **(fused_layer_forwards(decoder) if fused_layers else {})}


@contextmanager
def labeling_modules(model, forwards: dict, device: torch.device):
    """The fast forwards in place for label scoring (graphs.fast_modules): LoRA inputs uncast under low-precision
    autocast, attention off cuDNN on CUDA."""
    autocast = torch.is_autocast_enabled(device.type)
    low = autocast and torch.get_autocast_dtype(device.type) != torch.float32
    with fast_modules(model, forwards, uncast_lora_input=low, skip_cudnn_attention=device.type == "cuda"):
        yield


class NonFiniteError(FinLLMError):
    """Too many non-finite steps in a row."""


class FinLLM(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        quantization: hf.Quantization = "nf4",
        compute_dtype: hf.DType = "auto",
        attn_implementation: Optional[str] = "sdpa",
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
        chunk_tokens: Optional[int] = None,
        cuda_graphs: bool = False,
        compile_layers: bool = False,
        fused_layers: bool = False,
        dequantize_once: bool = False,
        merge_for_labeling: bool = False,
        max_nonfinite_steps: int = 5,
        labels: list[str] = list(DEFAULT_LABELS),
        predict_mode: Literal["score", "generate"] = "score",
        max_new_tokens: int = 16,
        prefix_reuse: bool = True,
    ) -> None:
        """
        Args:
            model_name_or_path: hub id, local model folder, or builtin:tiny-deepseek (built offline).
            quantization: nf4 / fp4 (4-bit bitsandbytes, double quant) or none (plain weights in compute_dtype).
            compute_dtype: auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU), bfloat16, float16, float32.
            attn_implementation: sdpa, eager, flash_attention_2, or null for the model's default.
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
            gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
            chunk_tokens: run a training micro-batch of more padded tokens (rows x length) than this as chunks of
                rows (a power of two each), one forward + backward per chunk, gradients summed: the same step, with
                the activation memory of the longest micro-batches capped. null = whole micro-batches.
            cuda_graphs: replay each training micro-batch's forward + backward from a CUDA graph (one per length
                bucket; finllm_pl/graphs.py): 2.2-2.6x faster epochs for the 1.5B model on an H100, same
                losses. fit on one GPU, bf16 or fp32, no gradient checkpointing; without CUDA the same fixed-shape
                step runs eagerly. validate and predict ignore it.
            compile_layers: torch.compile the decoder layers' norms and MLPs inside the CUDA-graph training step
                and in predict's label scoring (fused kernels; one compiled forward per class serves every
                layer). Needs cuda_graphs. On an H100: epochs 28.9 / 17.8 -> 25.5 / 14.9 s (first / later; the
                first compiles); predict 2,306 -> 2,713 rows/s once compiled (each process compiles first: ~4-10 s
                on a new machine, ~3-4 s where torch's disk cache has the kernels), so predict compiles only for
                jobs of LABEL_COMPILE_MIN_ROWS (50,000) rows or more per process. With fused_layers, only the
                norms and MLPs it does not cover are compiled.
            fused_layers: run RMSNorms as torch's fused rms_norm, SiLU-gated MLPs' `silu(gate) * up` and the
                attention's rotary embedding as one kernel each way (finllm_pl/kernels.py, compiled by a thread
                while the model loads), in training and label scoring, with nothing to torch.compile: as fast as
                compile_layers' kernels without its ~5 s of compiling in each new process (H100, fast config:
                first epoch 21.2 -> 16.5-16.7 s, later 13.3 s either way; predict 13,173 rows 2,407 -> 2,705-2,780
                rows/s; with the rotary kernel and the compile thread 14.3-15.1 / 12.3-12.7 s). Norm, MLP and
                attention classes that compute something else keep their own forward. Same results up to float
                rounding (the MLP and rotary kernels bit for bit eager torch). In label scoring on CUDA the
                attention also runs its grouped query heads without repeating keys/values (finllm_pl/attention.py:
                the same bits, 13,173 rows' GPU time 4.17-4.33 -> 3.86-3.97 s with fused.py's in-place LoRA add).
            dequantize_once: keep the 4-bit base dequantized (in compute dtype) for the whole run instead of
                dequantizing every layer at every forward and backward: the same weights and results, fewer GPU
                kernels per step, +2 bytes per base weight of memory (2.6 GB for the 1.5B model).
            merge_for_labeling: validate / predict (not fit): fold the adapter into the base weights in memory
                first (peft merge_adapter), as `export --merged` does on disk: the whole predict job 2,963 ->
                3,204 rows/s on an H100 (one call), scores equal up to bf16 rounding (a small adapter update loses
                precision when added into bf16 weights). Needs full-precision base weights: dequantize_once or
                quantization none.
            max_nonfinite_steps: stop the run after this many non-finite steps in a row (each one is skipped).
            labels: the label set scored by validation and predict (linked to data.labels).
            predict_mode: score (the label with the highest log P(label + EOS | prompt); always a valid label, with
                probabilities) or generate (greedy free text, parsed; an answer naming no single label is
                written as label null and counted as unparsed).
            max_new_tokens: longest generated answer in predict_mode=generate.
            prefix_reuse: when scoring labels, run the prompt prefix all rows of a batch share (template, system
                prompt, instruction) once instead of per row: same scores up to float rounding, ~1.3x faster.
        """
        super().__init__()
        if merge_for_labeling and quantization != "none" and not dequantize_once:
            raise ConfigError("model.merge_for_labeling folds the adapter into full-precision base weights: set "
                              "model.dequantize_once true (or model.quantization none)")
        if accumulate_grad_batches < 1:
            raise ConfigError(f"model.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if compile_layers and not cuda_graphs:
            raise ConfigError("model.compile_layers compiles inside the CUDA-graph training step: set "
                              "model.cuda_graphs true (or model.compile_layers false)")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ConfigError(f"model.chunk_tokens must be >= 1 or null, got {chunk_tokens}")
        if max_new_tokens < 1:
            raise ConfigError(f"model.max_new_tokens must be >= 1, got {max_new_tokens}")
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate must be > 0, got {learning_rate}")
        self.save_hyperparameters()
        self._prefix_memo: dict = {}  # label scoring's prefix KV caches, emptied at each validation/predict start
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks its keys
        self.model = None
        self.tokenizer = None
        self._window = {"loss": 0.0, "tokens": 0, "micro": 0, "t0": None, "all_tokens": 0}
        self._nonfinite_in_row = 0
        self._nonfinite_total = 0  # skipped steps of the whole run (kept in checkpoints), logged every step
        self._pending: dict[str, Any] = {}
        self._nonfinite_count: Any = 0  # the same total as a device tensor (logged every step without a sync)
        self._in_flight = None  # (step, event, seconds) of the optimizer step whose outcome is not read back yet
        self._readback: Optional[torch.Tensor] = None  # that outcome: (fault, mean loss, tokens), pinned on GPUs
        self._shown: dict[str, float] = {}  # progress bar values of the last step read back
        self.schedule = None
        self._graphed = None  # GraphedLossBackward when model.cuda_graphs
        self._label_forwards: Optional[dict] = None  # predict's forwards with compiled ones (on_predict_epoch_start)
        self._fused_forwards: Optional[dict] = None  # labeling's: fused.py's linears (+ kernels.py's norms and MLPs)
        self._train_forwards: Optional[dict] = None  # model.fused_layers in the eager training step
        self._merged = False  # model.merge_for_labeling done
        self._warmup: Optional[threading.Thread] = None  # predict's warm-up labeling pass (_start_warm_up)
        self._resumed_step: Optional[int] = None  # the optimizer step of the checkpoint fit resumed from

    # -- model -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        dtype = hf.torch_dtype(hp.compute_dtype, device)
        if device.type == "cpu":
            # Tiny gradients and Adam moments become denormal floats, which x86 CPUs handle ~10-50x slower.
            torch.set_flush_denormal(True)
        if hp.fused_layers:
            compile_in_background(device, dtype)  # kernels.py's kernels, compiled while the model loads
        if self._trainer is not None and self.trainer.state.fn == "predict":
            self._start_warm_up(device, dtype)
        self.tokenizer = hf.load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        base = hf.load_base_model(hp.model_name_or_path, hp.quantization, dtype, device, hp.attn_implementation,
                                  hp.trust_remote_code)
        base.config.use_cache = False
        if hp.dequantize_once and hp.quantization != "none":
            # transformers' own: each 4-bit layer becomes a plain one holding dequantize_4bit(weight), the very
            # values every 4-bit forward and backward computes before its matmul. Same results, 3 fewer kernels per
            # layer per forward and per backward (~1/6 of a QLoRA step's), +2 bytes per weight for the run.
            base = base.dequantize()
        if hp.adapter_path:
            model = hf.load_adapter(base, hp.adapter_path, trainable=True)
            if hp.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            # LoRA's A matrices are drawn from the RNG: seed them from the run's seed, not from whatever loading
            # and tokenizing consumed before (which differs between a first run and a cached one).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)))
                model = hf.add_lora(base, hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules,
                                    hp.gradient_checkpointing, use_dora=hp.use_dora)
        model.train()  # from_pretrained returns eval mode: LoRA dropout would silently be off in training
        self.model = model
        fitting = self._trainer is None or self.trainer.state.fn == "fit"  # validate/predict never capture
        if hp.cuda_graphs and fitting:
            self._graphed = self._make_graphed(model, dtype, device)
        elif hp.fused_layers and fitting:
            self._train_forwards = fused_layer_forwards(hf.split_head(model)[0])
        if hp.fused_layers and fitting and not (self._graphed.fused_layers if self._graphed else self._train_forwards):
            rank_zero_warn("model.fused_layers: none of this model's norms, MLPs or attention layers computes what "
                           "finllm_pl/kernels.py fuses (an RMSNorm, a SiLU-gated MLP, HF's rotary embedding); they run "
                           "their own forwards")
        self.metrics = label_metrics(len(hp.labels)).to(device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rank_zero_info(f"model {hp.model_name_or_path}: {n_train:,} trainable parameters, "
                       f"quantization={hp.quantization}, compute dtype={dtype}")

    def _make_graphed(self, model, dtype: torch.dtype, device: torch.device):
        hp = self.hparams
        if hp.gradient_checkpointing:
            raise ConfigError("model.cuda_graphs and model.gradient_checkpointing cannot both be on; turn one off")
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            raise ConfigError("model.cuda_graphs runs on one GPU only (DDP's gradient sync is not captured); set "
                              "model.cuda_graphs false (and model.compile_layers false) for multi-GPU runs")
        if trainer is not None and str(trainer.precision).startswith("16"):
            raise ConfigError("model.cuda_graphs does not support fp16 loss scaling; use trainer.precision "
                              "bf16-mixed or 32-true, or model.cuda_graphs false (and model.compile_layers false)")
        if device.type != "cuda":
            rank_zero_warn("model.cuda_graphs: no CUDA device, so the fixed-shape training step runs eagerly "
                           "(same results, no speed-up)")
        return GraphedLossBackward(model, dtype, use_graphs=device.type == "cuda", max_tokens=hp.chunk_tokens,
                                   compile_layers=hp.compile_layers, fused_layers=hp.fused_layers)

    def trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    # -- optimization --------------------------------------------------------------------------------------
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
        # fused: one kernel for all ~200 LoRA tensors, and it can skip a non-finite step on the device (found_inf)
        opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=True)
        try:
            self.schedule = resolve_schedule(self.total_optimizer_steps(), hp.warmup_steps, hp.learning_rate,
                                             hp.warmup_overflow, min_lr_ratio=hp.min_lr_ratio, decay=hp.lr_decay)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rank_zero_info(f"schedule: {self.schedule.total_steps} optimizer steps, warmup {self.schedule.warmup_steps}, "
                       f"{hp.lr_decay} decay, peak lr {hp.learning_rate:g}")
        sched = LambdaLR(opt, self.schedule.factor)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        w = self._window
        if w["t0"] is None:
            w["t0"] = time.perf_counter()
        boundary = (batch_idx + 1) % self.hparams.accumulate_grad_batches == 0 or self.trainer.is_last_batch
        if self._graphed is not None:  # forward + backward from CUDA graphs (one GPU); gradients added to p.grad
            if "g_ids" not in batch:
                raise ConfigError("model.cuda_graphs needs fixed-shape batches: data.static_batches is linked "
                                  "to it by the CLI; with another datamodule, collate with "
                                  "finllm_pl.data.collate_train(..., static=True)")
            loss, n = self._graphed(batch)
        else:
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            parts = row_chunks(*ids.shape, self.hparams.chunk_tokens)
            loss = n = 0
            for i, part in enumerate(parts):
                # no DDP all-reduce until the window's last backward; backward inside fast_modules too, as
                # gradient checkpointing runs the forwards again there
                with opt.toggle_model(sync_grad=boundary and i == len(parts) - 1), \
                        fast_modules(self.model, self._train_forwards or {}, False, False):
                    part_loss, part_n = loss_sum(self.model, ids[part], mask[part], labels[part])
                    self.manual_backward(part_loss)
                loss, n = loss + part_loss.detach(), n + part_n
        # Kept as device tensors: reading them back each micro-batch would stall the GPU twice per batch.
        w["loss"] = w["loss"] + loss.detach().double()
        w["tokens"] = w["tokens"] + n
        w["all_tokens"] = w["all_tokens"] + batch["attention_mask"].sum()
        w["micro"] += 1
        if boundary:
            self._optimizer_step(opt, sched)

    def _optimizer_step(self, opt, sched) -> None:
        # Nothing here reads a GPU value back: the host queues this step and goes on to the next batch while the
        # GPU works (a read would idle the GPU while the host does the next step's Python work). The outcome
        # (skipped? loss?) is read one step later, by `_drain`, when it is long finished.
        self._drain()
        w, step = self._window, self.global_step
        totals = torch.stack([torch.as_tensor(w[k], dtype=torch.float64, device=self.device)
                              for k in ("loss", "tokens", "all_tokens")])
        loss_total, tokens, all_tokens = self.trainer.strategy.reduce(totals, reduce_op="sum").unbind()  # all ranks
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        # DDP averaged the summed-loss gradients over ranks; scale so they are d(mean token loss) of the window. A
        # non-finite loss makes the scale NaN: the gradients carry the fault to whichever check skips the step.
        scale = (self.trainer.world_size / tokens.clamp(min=1.0)).float()
        torch._foreach_mul_(grads, torch.where(torch.isfinite(loss_total), scale, torch.nan))  # one kernel per dtype
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads])))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        # fp16: the gradients are still multiplied by the loss scale here (the fused optimizer unscales them), so
        # the clip threshold is too. Inf gradients with a finite loss are the scaler's business (it skips the step
        # and backs off); a non-finite loss is a fault the scaler cannot fix, and counts like any other.
        loss_scale = scaler.get_scale() if scaler is not None else 1.0
        fault = ~torch.isfinite(loss_total) if scaler is not None else ~torch.isfinite(grad_norm)
        if self.hparams.gradient_clip_val > 0:
            # torch.nn.utils.clip_grad_norm_'s rule, on the norm already computed (Lightning's clip_gradients
            # refuses the fused optimizer)
            limit = self.hparams.gradient_clip_val * loss_scale
            torch._foreach_mul_(grads, (limit / (grad_norm + 1e-6)).clamp(max=1.0))
        if scaler is None:  # the fused AdamW skips the update on the GPU: the adapter and its moments stay as they were
            opt.optimizer.found_inf = fault.float()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        opt.optimizer.__dict__.pop("found_inf", None)
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._nonfinite_count = self._nonfinite_count + fault.long()  # running total on the device, logged each step
        elapsed = max(time.perf_counter() - w["t0"], 1e-9)
        mean_loss = loss_total / tokens.clamp(min=1.0)
        self.log_dict({
            "train/loss": mean_loss,
            "train/lr": torch.tensor(lr),  # host values as CPU tensors: a Python float would become a GPU tensor
                                           # by a blocking copy, which waits for the whole queue
            "train/grad_norm": grad_norm / loss_scale,
            "train/tokens_per_s": all_tokens / elapsed,
            "train/supervised_tokens": tokens,
            "train/nonfinite_steps": self._nonfinite_count.double(),
        }, prog_bar=False, rank_zero_only=True)
        for name, value in self._shown.items():  # the progress bar shows the previous step's (already read back)
            self.log(name, torch.tensor(value), prog_bar=True, logger=False, rank_zero_only=True)
        # Read back next step (pinned memory: the copy does not wait for the GPU; the event says when it landed).
        record = torch.stack([fault.double(), mean_loss, all_tokens])
        if self._readback is None:
            self._readback = torch.empty(3, dtype=torch.float64, pin_memory=self.device.type == "cuda")
        self._readback.copy_(record, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._in_flight = (step, event, elapsed)
        self._reset_window()

    def _drain(self, stop: bool = True) -> None:
        """The previous optimizer step's outcome, now that it is done: count, warn, show; stop after too many."""
        if self._in_flight is not None:
            step, event, elapsed = self._in_flight
            self._in_flight = None
            if event is not None:
                event.synchronize()
            fault, loss, all_tokens = self._readback.tolist()
            if fault:
                self._nonfinite_in_row += 1
                self._nonfinite_total += 1
                rank_zero_warn(f"step {step}: non-finite loss or gradient; optimizer step skipped "
                               f"({self._nonfinite_in_row} in a row)")
            else:
                self._nonfinite_in_row = 0
                self._shown = {"loss": loss, "tok/s": all_tokens / elapsed}
        if stop and self._nonfinite_in_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self._nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient; stopping. "
                "They were skipped: the adapter in the last checkpoint is the one from before them. Lower "
                "model.learning_rate or check the data, then resume with --ckpt_path last"
            )

    def _reset_window(self) -> None:
        self._window = {"loss": 0.0, "tokens": 0, "micro": 0, "t0": None, "all_tokens": 0}

    # -- validation: loss + label scoring ------------------------------------------------------------------
    def _merge_for_labeling(self) -> None:
        """Fold the adapter in (once), after any checkpoint's weights were loaded: validate/predict runs only."""
        if (self.hparams.merge_for_labeling and self.trainer.state.fn != "fit" and not self._merged
                and hasattr(self.model, "merge_adapter")):  # (an untuned base has no adapter to fold in)
            self.model.merge_adapter()
            self._merged = True

    def on_validation_epoch_start(self) -> None:
        self._merge_for_labeling()
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.metrics.reset()
        self._prefix_memo = {}  # prefix KV caches of this run only: training changes the adapter between runs

    def _start_warm_up(self, device: torch.device, dtype: torch.dtype) -> None:
        """Label a made-up batch with a one-layer stand-in of the model (hf.stand_in_model: its classes and
        matrix shapes, uninitialized weights) in a thread while the real model loads, so that the first real batch
        does not pay for what only a process's first batch pays: CUDA loads each kernel's code at its first
        launch, cuBLAS sets up. The batch is shaped like real ones (WARM_UP_ROWS); its scores are thrown away.
        Label scoring on WARM_UP_DEVICES only; on_predict_epoch_start waits for it.
        On an H100 (13,173 rows, 3 + 3 runs alternating with the code before, one machine): the first batch's
        host time 0.47-0.60 -> 0.10-0.17 s, the job 2,756-2,827 -> 2,898-3,016 rows/s with the wait for the
        first batch, the whole command (loading included) 9.25-10.66 vs 9.24-10.05 s, the same output bits
        (results/gpu/predict_rows_warm_up.json).
        The stand-in is built and the fast paths' forwards are probed here, in the calling thread, before the real
        model loads: transformers' loading patches torch process-wide (e.g. new parameters made on the meta
        device), so nothing that makes modules may run beside it (probed there, the real model's norms lost their
        fused forward). The thread only runs the forward."""
        hp = self.hparams
        if device.type not in WARM_UP_DEVICES or hp.predict_mode != "score":
            return
        try:
            model = hf.stand_in_model(hp.model_name_or_path, dtype, device, hp.lora_r, hp.lora_alpha,
                                      hp.lora_target_modules, hp.attn_implementation, hp.trust_remote_code,
                                      vocab_size=WARM_UP_VOCAB)
            model.eval()
            forwards = labeling_forwards(hf.split_head(model)[0], hp.fused_layers)
            batch = warm_up_batch(len(hp.labels), device)
        except Exception as e:  # (the first real batch then pays, as it would without this)
            rank_zero_warn(f"predict's warm-up batch could not be made ({type(e).__name__}: {e}); labeling goes on")
            return
        context = self.trainer.precision_plugin.predict_step_context()  # (autocast's state is per thread)
        # (not a daemon: a run that fails while the model loads waits for it at exit, before CUDA is torn down)
        self._warmup = threading.Thread(target=self._warm_up, args=(model, forwards, batch, device, context),
                                        name="finllm-warm-up")
        self._warmup.start()  # (Thread.run drops its arguments when done: the stand-in is freed then)

    def _warm_up(self, model, forwards: dict, batch: dict[str, Any], device: torch.device, context) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # (a new thread starts on GPU 0; under DDP its rank's GPU)
            with torch.inference_mode(), context, labeling_modules(model, forwards, device):
                score_labels(model, batch["prompt_ids"], batch["prompt_mask"], batch["label_ids"],
                             batch["label_mask"], min_prefix=8 if self.hparams.prefix_reuse else 0, prefix_memo={},
                             prefix=batch["prefix_ids"]).cpu()  # (waits for the GPU)
        except Exception as e:
            rank_zero_warn(f"predict's warm-up batch failed ({type(e).__name__}: {e}); labeling goes on without it")

    def _wait_for_warm_up(self) -> None:
        if self._warmup is not None:
            self._warmup.join()
            self._warmup = None

    def on_predict_epoch_start(self) -> None:
        self._wait_for_warm_up()
        self._merge_for_labeling()
        self._prefix_memo = {}
        self._label_forwards = None
        # (model.fused_layers may leave nothing to compile)
        plain = self._labeling_forwards()
        compiled = compiled_forwards(hf.split_head(self.model)[0], skip=plain) if self.hparams.compile_layers else {}
        path = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("predict_path")
        if compiled and path and os.path.isfile(path):
            rows = _count_lines(path) // self.trainer.world_size  # (every input format is line-based)
            if rows < LABEL_COMPILE_MIN_ROWS:
                compiled = {}
                rank_zero_info(f"model.compile_layers: not compiling for ~{rows:,} rows to label per process "
                               f"(it pays from ~{LABEL_COMPILE_MIN_ROWS:,})")
        if compiled:
            self._label_forwards = {**plain, **compiled}

    def _labeling_forwards(self) -> dict:
        """Labeling's forwards (`labeling_forwards`), made once per model."""
        if self._fused_forwards is None:
            self._fused_forwards = labeling_forwards(hf.split_head(self.model)[0], self.hparams.fused_layers)
        return self._fused_forwards

    @contextmanager
    def _labeling_modules(self):
        """A context for validation and label scoring: the attention's linears with fewer kernels (fused.py; q/k/v
        as one matmul); LoRA layers take their input uncast under bf16/fp16 autocast (bit-identical, fewer
        copies); with model.fused_layers, norms and MLPs in fused kernels (kernels.py); with model.compile_layers, in
        predict runs, compiled norms and MLPs (dynamic shapes; those fused_layers leaves) are in place for jobs of
        LABEL_COMPILE_MIN_ROWS rows or more (not in validation: its sets are a few hundred or thousand
        rows, and compiling would cost more than it saves); on CUDA, attention does not use cuDNN's kernel. cuDNN
        builds an execution plan for each new shape, and every labeling batch has its own (rows x length). On an
        H100, 52,692 rows in 133 batches of <= 32,768 tokens: 2,886 rows/s with cuDNN, 3,077 and 3,242 without
        (three calls; in 77 batches of <= 65,536 tokens 2,920 vs 2,943 in one call;
        results/gpu/predict_rows_chunks*.json). SDPA's memory-efficient kernel serves the same masks."""
        forwards = self._labeling_forwards()
        if self._label_forwards is not None and self.trainer.state.fn == "predict":  # (set by predict runs only)
            forwards = self._label_forwards
        with labeling_modules(self.model, forwards, self.device):
            yield

    def _score(self, batch: dict[str, Any]) -> torch.Tensor:
        """Label scores of a batch (inside `_labeling_modules`, which the caller enters once per step)."""
        return score_labels(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["label_ids"],
                            batch["label_mask"], min_prefix=8 if self.hparams.prefix_reuse else 0,
                            prefix_memo=self._prefix_memo, prefix=batch["prefix_ids"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with self._labeling_modules():
            loss, n = loss_sum(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            scores = self._score(batch)
        self._val += torch.stack([loss.detach().double(), n.double()])
        keep = batch["gold"] >= 0
        if keep.any():
            self.metrics.update(scores.argmax(-1)[keep], batch["gold"][keep])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        val_loss = float(total[0] / total[1].clamp(min=1))
        values = self.metrics.compute()  # torchmetrics sums the states of all ranks (padding rows were never added)
        # Already totals over all ranks, the same on each: sync_dist=True + rank_zero_only=True runs no collective
        # and keeps Lightning from warning that epoch-level values should be synced.
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True, rank_zero_only=True)
        for k in ("accuracy", "f1_macro", "f1_weighted"):
            self.log(f"val/{k}", float(values[k]), prog_bar=k == "f1_weighted", sync_dist=True, rank_zero_only=True)
        self.last_report = summarize(values, self.hparams.labels, {"val_loss": val_loss})

    # -- prediction: label scoring (default) or free-text generation -----------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.hparams.predict_mode == "generate":
            return {"rows": batch["rows"], "texts": self._generate(batch["prompt_ids"], batch["prompt_mask"])}
        with self._labeling_modules():
            scores = self._score(batch).float()
        if scores.device.type != "cuda":
            return {"rows": batch["rows"], "scores": scores.cpu()}
        # Copied into pinned memory without waiting for it: the writer reads the scores one batch later (the event
        # says when they landed), so the GPU scores the next batch while the host writes this one's rows.
        host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return {"rows": batch["rows"], "scores": host, "ready": ready}

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Greedy answers (prompts are left-padded, so every row's answer starts in the same column)."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        config = GenerationConfig(max_new_tokens=self.hparams.max_new_tokens, do_sample=False, use_cache=True,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        stop = {tok.eos_token_id, tok.pad_token_id}
        texts = []
        for row in out.tolist():
            end = next((i for i, t in enumerate(row) if t in stop), len(row))
            # Special tokens are kept: <think>...</think> must stay visible for parse_generated to drop it.
            texts.append(tok.decode(row[:end], skip_special_tokens=False))
        return texts

    # -- checkpoints: adapter only ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drain(stop=False)  # the skipped-step count must be current (a stop comes at the next step)
        keys = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        hp = self.hparams
        meta = {
            "base_model": hp.model_name_or_path,
            "lora": {"r": hp.lora_r, "alpha": hp.lora_alpha, "target_modules": list(hp.lora_target_modules)},
            "world_size": self.trainer.world_size,
            "nonfinite_steps": self._nonfinite_total,
            "rng": {"cpu": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            meta["rng"]["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        w = self._window
        if w["micro"]:  # saved mid accumulation window: keep what it accumulated so far
            meta["window"] = {k: v for k, v in w.items() if k != "t0"}
            meta["window"]["grads"] = {n: p.grad.detach().cpu().clone() for n, p in self.model.named_parameters()
                                       if p.requires_grad and p.grad is not None}
        checkpoint["finllm"] = meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        meta = checkpoint.get("finllm")
        if meta is None:
            raise ModelError(f"{path}: not a finllm_pl checkpoint (no adapter metadata); give a .ckpt that fit wrote")
        have, want = set(checkpoint["state_dict"]), self.trainable_keys()
        shapes_ok = have == want and all(
            checkpoint["state_dict"][k].shape == p.shape
            for k, p in ((f"model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad))
        if not shapes_ok:
            hp = self.hparams
            raise ModelError(
                f"{path}: checkpoint is an adapter for {meta['base_model']} with LoRA r={meta['lora']['r']} on "
                f"{meta['lora']['target_modules']}, but this run is {hp.model_name_or_path} with r={hp.lora_r} on "
                f"{list(hp.lora_target_modules)}; use the matching config"
            )
        check_adapter_matches(path, checkpoint, self.hparams)  # same shapes, but another base model or LoRA scale
        if self._trainer is not None and self.trainer.training and meta.get("world_size", 1) != self.trainer.world_size:
            raise ModelError(
                f"{path}: saved by a run on {meta['world_size']} process(es), resumed on {self.trainer.world_size}: "
                "the data order would change. Resume on the same number of devices, or start a new run from the "
                "adapter with --model.adapter_path"
            )
        self._pending = meta
        self._resumed_step = checkpoint.get("global_step")

    def on_fit_end(self) -> None:
        if self._resumed_step is not None and self.global_step == self._resumed_step:
            rank_zero_info(f"{self.trainer.ckpt_path}: this run had already finished (step {self._resumed_step}); "
                           "nothing was trained. To train longer, raise trainer.max_epochs and/or trainer.max_steps")

    def on_train_epoch_end(self) -> None:
        self._drain()  # the epoch's last step: its skip is counted (and may stop the run) before the epoch ends

    @property
    def window_open(self) -> bool:
        """True between the first micro-batch of an accumulation window and its optimizer step."""
        return self._window["micro"] > 0

    def on_train_start(self) -> None:
        meta, self._pending = self._pending, {}
        if self._resumed_step is not None:
            # The next step's LR is this run's schedule's, not the one saved in the optimizer's state: they differ
            # when max_epochs / max_steps was raised (the saved one is the old schedule's last, 0 for linear decay).
            opt, sched = self.optimizers(), self.lr_schedulers()
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * self.schedule.factor(self.global_step)
        if not meta:
            # Restart the RNG stream (LoRA dropout) from the run's seed at the first step, whatever setup consumed
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
            win = dict(meta["window"])
            grads = win.pop("grads")
            for n, p in self.model.named_parameters():
                if n in grads:
                    p.grad = grads[n].to(p.device, p.dtype)
            self._window = {**win, "t0": None}


def _count_lines(path: str) -> int:
    """Newlines in a file (~0.05 s per 100 MB): about its rows, to size a labeling job before reading it."""
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
