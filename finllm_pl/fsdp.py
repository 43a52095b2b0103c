"""FSDP-QLoRA: the 4-bit base model sharded over the ranks with PyTorch's FSDP (through Lightning), the LoRA adapter
trained exactly as on one GPU (the same manual optimization, window normalisation, non-finite skip and schedule).

    python -m finllm_pl fit --config configs/<model>.yaml --config configs/fsdp.yaml --trainer.devices N
    (or --trainer.strategy fsdp_qlora: this class under a registered name)

Each rank holds 1/N of every weight (4-bit base, norms, embeddings, LoRA) between forwards instead of a whole copy
as under DDP; a unit's weights are all-gathered for its forward and backward and dropped after. What this needs:

- units: every decoder layer (the model's own class, from its `_no_split_modules`, else the class of its layer
  list: nothing is hard-coded per architecture) and every LoRA linear is an FSDP unit of its own; the rest
  (embeddings, final norm, LM head) is the root unit. FSDP flattens a unit's parameters into one tensor of one dtype:
  the LoRA weights (fp32, trainable) cannot share a unit with the base's (compute dtype, frozen).
- 4-bit storage: the packed NF4 bytes are stored as the compute dtype (`bnb_4bit_quant_storage`, the same bytes
  seen as bf16 / fp32 instead of uint8; the same numbers come out): a decoder layer's unit holds its norms (compute
  dtype) beside its 4-bit weights. Their quantization constants are not parameters and stay whole on every rank
  (bitsandbytes keeps them on the module, where FSDP's re-created parameter views find them again).
- no FSDP mixed precision: FSDP's param_dtype cast would turn the packed 4-bit bytes into other numbers. Parameters
  keep their dtype, autocast computes in bf16 (Lightning's bf16-mixed) as on one GPU, LoRA gradients are
  reduce-scattered in fp32.
- use_orig_params: the optimizer, the gradient norm and the window checkpoint see the LoRA parameters by name
  (each rank's parameter is a view of its shard, empty where the rank holds none of it).
- the model is wrapped by the LightningModule (configure_model -> `shard`), not by Lightning's FSDPStrategy (which
  would wrap the LightningModule itself, run training_step inside the root unit's forward, and on CPU pass
  device_id=None, which FSDP refuses); Lightning sees a wrapped model and leaves it as it is.
- gradient norm (clipping, the non-finite skip): each rank's shards' squared norm, all-reduced over the shard group
  (a local foreach norm would be one rank's part of it, and ranks would clip and skip differently).
- gradient accumulation without no_sync: every micro-batch's gradients are reduce-scattered and summed into the
  shards (FSDP's no_sync would keep whole unsharded gradients per rank).
- checkpoints: gathered (state_dict_type "full"), the adapter only, in the very format of a one-GPU or DDP
  checkpoint: the LoRA tensors whole by their one-GPU names, the optimizer state whole (FSDP's full optimizer state
  dict, keyed by the optimizer's parameter order as torch keys it), written once, by rank 0; `export` and
  `--model.adapter_path` take them as they are. Saved mid-window, each rank's shard of the gradients accumulated so
  far (already reduced over the ranks: what rank r holds is its own to get back). Resume needs the same world size
  (as under DDP: the data order depends on it; the gradient shards too), and a mid-window checkpoint the same kind
  of strategy. Restored before setup, as on one GPU (the data position must be in place before the train loader
  is built).
- export at the end of fit: the adapter is gathered on every rank (strategy.on_train_end), rank 0 writes it.
- every forward is a collective: training and validation batches are padded to the same count on every rank
  already; predict (chunks dealt round-robin, unpadded) runs the ranks in lockstep, a rank out of batches running
  made-up ones; generate gathers the root unit's weights (it calls the model's inner forward) and keeps decoding
  steps in step (synced_gpus). model.chunk_tokens (a rank-dependent number of chunk forwards) is refused.
- the fast backend: only components that touch weights inside a unit's own forward may run (`kernels`,
  `folded_attention`, each still self-checked); the others read weights (or concatenate them) outside the unit
  forwards, where they are shards, and step aside with the reason (`plan`).

Refused with one line (ConfigError), before anything loads: Lightning's plain `fsdp` strategy, sharding other than
FULL_SHARD, CPU offload, FSDP mixed precision, an auto-wrap or activation-checkpointing policy of one's own, a sharded
state dict, use_orig_params=False, *-true precisions whose dtype is not the compute dtype, merge_for_labeling, DoRA,
chunk_tokens.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.strategy import Strategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp._common_utils import clean_tensor_name
from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

from .errors import ConfigError, ModelError

NAME = "fsdp_qlora"
SHARDINGS = ("FULL_SHARD",)
NOT_TAKEN = {  # sharding strategies refused, and why
    "NO_SHARD": "that is DDP: use --trainer.strategy ddp",
    "SHARD_GRAD_OP": "with a 4-bit base FSDP stops at the first backward (bitsandbytes puts a new weight parameter "
                     "in each 4-bit layer at every forward, which FSDP allows between forward and backward only when "
                     "it reshards after forward); unquantized, its gathered adapter differed from one process's on "
                     "CPU (torch 2.13)",
    "HYBRID_SHARD": "the gradient norm and the checkpoints are written for one shard group",
    "_HYBRID_SHARD_ZERO2": "the gradient norm and the checkpoints are written for one shard group",
}

# fast backend components that cannot run on a sharded model, and why (the others are self-checked as usual)
_OUTSIDE = "outside the FSDP root unit's forward, where the embedding and head weights are shards"
NOT_SHARDED = {
    "dequantize": "FSDP-QLoRA keeps the base 4-bit (sharded); dequantized it would be a plain LoRA run with four "
                  "times the base's memory",
    "sparse_head": f"it runs the decoder and the LM head directly, {_OUTSIDE}",
    "label_tree": f"it runs the decoder and the LM head directly, {_OUTSIDE}",
    "prefix_reuse": f"it runs the decoder directly, {_OUTSIDE}, and keeps caches across batches",
    "static_step": f"the static step runs the decoder and the LM head directly, {_OUTSIDE}",
    "cuda_graphs": "it replays the static step (one GPU)",
    "lora_groups": "it concatenates the q/k/v LoRA weights outside their FSDP units' forwards, where they are shards",
}

# options of Lightning's FSDPStrategy this one does not take, and why
REFUSED = {
    "auto_wrap_policy": "finllm_pl wraps the model's decoder layers and each LoRA linear itself (FSDP-QLoRA needs the "
                        "fp32 LoRA weights in units of their own); leave it unset",
    "mixed_precision": "FSDP's parameter cast would turn the packed 4-bit weights into other numbers; leave it unset "
                       "(trainer.precision bf16-mixed computes in bf16 under autocast)",
    "activation_checkpointing": "use model.gradient_checkpointing",
    "activation_checkpointing_policy": "use model.gradient_checkpointing",
    "device_mesh": "HYBRID_SHARD is not supported",
}


def _sharding_name(value: Any) -> str:
    return value.name if isinstance(value, ShardingStrategy) else str(value).upper()


def _refusal(sharding: str, kwargs: Mapping[str, Any]) -> Optional[str]:
    """Why these FSDPStrategy options cannot work here (None: they can)."""
    for key, why in REFUSED.items():
        if kwargs.get(key) is not None:
            return f"trainer.strategy.{key}: not taken by {NAME}: {why}"
    if kwargs.get("cpu_offload"):
        return (f"trainer.strategy.cpu_offload: not taken by {NAME}: FSDP cannot accumulate gradients over "
                "micro-batches with offloaded parameters (outside no_sync), which every accumulation window does")
    if kwargs.get("state_dict_type", "full") != "full":
        return (f"trainer.strategy.state_dict_type: {NAME} saves the adapter gathered (full); a sharded checkpoint "
                "of a LoRA adapter would save nothing worth sharding")
    if kwargs.get("use_orig_params", True) is not True:
        return (f"trainer.strategy.use_orig_params: {NAME} needs it true (the optimizer, the gradient norm and "
                "checkpoints use the LoRA parameters by name)")
    if sharding not in SHARDINGS:
        why = NOT_TAKEN.get(sharding, "unknown")
        return f"trainer.strategy.sharding_strategy={sharding}: {NAME} takes {' or '.join(SHARDINGS)} ({why})"
    return None


class QLoRAFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy for a QLoRA LightningModule that shards its own model (`shard`, called from its
    configure_model), saves and loads the adapter gathered, and takes only the options that work for it.

    Args:
        sharding_strategy: FULL_SHARD (weights, gradients and optimizer state sharded; the others are refused,
            NOT_TAKEN says why).
        limit_all_gathers: FSDP's rate limiter (fewer all-gathers in flight: lower peak memory).
        forward_prefetch: all-gather the next unit's weights during the current unit's forward.
        backward_prefetch: BACKWARD_PRE (FSDP's default: more overlap, more memory), BACKWARD_POST or null.
    """

    strategy_name = NAME

    def __init__(self, sharding_strategy: str = "FULL_SHARD", limit_all_gathers: bool = True,
                 forward_prefetch: bool = False, backward_prefetch: Optional[str] = "BACKWARD_PRE",
                 **kwargs: Any) -> None:
        from torch.distributed.fsdp import BackwardPrefetch

        self._refused = _refusal(_sharding_name(sharding_strategy), kwargs)
        prefetch = BackwardPrefetch[str(backward_prefetch).upper()] if backward_prefetch else None
        super().__init__(sharding_strategy="FULL_SHARD" if self._refused else sharding_strategy,
                         limit_all_gathers=limit_all_gathers,
                         forward_prefetch=forward_prefetch, backward_prefetch=prefetch, **kwargs)

    def check(self) -> None:
        """ConfigError for an option this strategy does not take (raised when the Trainer is made, before any
        process starts: an error raised while the CLI instantiates the strategy would come wrapped in a parser
        error of many lines)."""
        if self._refused:
            raise ConfigError(self._refused)

    def _configure_launcher(self) -> None:
        self.check()
        super()._configure_launcher()

    # -- the model -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def model_sharded_context(self):
        yield  # (Lightning's enables FSDP's wrap() inside configure_model: the module calls `shard` instead)

    def quant_storage(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype the packed 4-bit weights are stored as: the compute dtype (that of the norms beside them)."""
        return compute_dtype

    def shard(self, model: torch.nn.Module) -> "ShardedModel":
        """The PEFT model wrapped: decoder layers and LoRA linears as units of their own (`auto_wrap_policy`)."""
        return ShardedModel.wrap(model, device=self.root_device, sharding_strategy=self.sharding_strategy,
                                 **self.kwargs)

    # -- checkpoints: the adapter gathered ---------------------------------------------------------------------------
    def _sharded(self) -> "ShardedModel":
        model = getattr(self.lightning_module, "model", None)
        if not isinstance(model, ShardedModel):
            raise ModelError(f"{NAME}: the LightningModule's model was not sharded (FinLLM.configure_model shards it)")
        return model

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The LoRA tensors, whole, by their one-GPU names (every rank calls this: the shards are all-gathered)."""
        return {f"model.{k}": v for k, v in self._sharded().gather_adapter().items()}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # As on one GPU: the model is sharded already (configure_model), and the data position must be restored
        # before setup builds the train loader (configure_optimizers asks for the run's length)
        return False

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # The CheckpointIO's load (weights only, one-line errors) on every rank; weights go in load_model_state_dict,
        # after the module's on_load_checkpoint has checked them, as on one GPU.
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        self._sharded().load_adapter_(state)

    def _full_state(self, rank0_only: bool):
        """FSDP's full (gathered) state dict settings, offloaded to the CPU from a GPU. On a CPU not "offloaded":
        torch 2.13's full optimizer state dict then skips its copy, and every state of a unit (exp_avg, exp_avg_sq)
        would be a view of the one gather buffer, all holding the last state gathered."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                    FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer state whole (the LoRA tensors' Adam moments), on rank 0, in torch's own format (keyed by
        the optimizer's parameter order, as a one-GPU or DDP checkpoint holds it: Lightning's FSDP keys it by the
        position among all the model's parameters)."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        with self._full_state(rank0_only=True):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer)
        return state

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.fsdp import OptimStateKeyType

        states = checkpoint.get("optimizer_states") or []
        if len(states) != len(self.optimizers):
            raise ModelError(f"checkpoint holds {len(states)} optimizer states, this run has {len(self.optimizers)}")
        with self._full_state(rank0_only=False):
            for optimizer, state in zip(self.optimizers, states):
                if not state["state"]:  # (saved before the first step: a fresh optimizer; its LR is the scheduler's)
                    continue
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
                state = FSDP.optim_state_dict_to_load(model=self.model, optim=optimizer, optim_state_dict=state)
                optimizer.load_state_dict(state)

    # -- predict: every rank in every forward ------------------------------------------------------------------------
    # Under FSDP a forward is a collective (each unit all-gathers its weights), and predict deals the input's chunks
    # round-robin without padding: ranks label different numbers of batches. So the ranks go in lockstep: before each
    # batch every rank says whether it has one (MAX over ranks); a rank that has none left runs a made-up batch of one
    # row through the same predict_step (the same forwards: one per label, or `generate`, whose decoding steps
    # HF's synced_gpus keeps in step) until no rank has a batch left. Its outputs go nowhere.
    def on_predict_start(self) -> None:
        super().on_predict_start()
        fetcher = self.lightning_module.trainer.predict_loop._data_fetcher
        if self.world_size > 1 and not getattr(fetcher, "batches", True) and not getattr(fetcher, "length", None):
            self._keep_in_step()  # this rank labels nothing: it takes part in the others' forwards until they are done

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.world_size == 1:
            return super().predict_step(*args, **kwargs)
        self._any_batch(True)
        out = super().predict_step(*args, **kwargs)
        if self.lightning_module.trainer.predict_loop.batch_progress.is_last_batch:
            self._keep_in_step()
        return out

    def _any_batch(self, mine: bool) -> bool:
        flag = torch.tensor([float(mine)], device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _keep_in_step(self) -> None:
        module = self.lightning_module
        pad, k = module.tokenizer.pad_token_id, len(module.hparams.labels)
        one = torch.ones(1, 1, dtype=torch.long, device=self.root_device)
        batch = {"prompt_ids": one * pad, "prompt_mask": one, "label_ids": torch.full((k, 1), pad, device=one.device),
                 "label_mask": torch.ones(k, 1, dtype=torch.long, device=one.device), "rows": []}
        while self._any_batch(False):
            super().predict_step(batch, -1)

    def on_train_end(self) -> None:
        """Every rank: gather the adapter for the export at the end of fit (written by rank 0 alone)."""
        super().on_train_end()
        self._sharded().gather_adapter(keep=True)


StrategyRegistry.register(NAME, QLoRAFSDPStrategy, description="FSDP-QLoRA: the 4-bit base sharded over the ranks, "
                                                               "LoRA trained as on one GPU (finllm_pl.fsdp)",
                          override=True)


# -- the sharded model ------------------------------------------------------------------------------------------------
def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The model's decoder layer class(es): those named in its `_no_split_modules` (transformers' own list of the
    blocks that must stay whole on one device), else the class of the longest ModuleList of alike modules."""
    from .backend.plain import base_model

    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if found:
        return found
    lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(x) for x in m}) == 1]
    if not lists:
        raise ModelError(f"{type(base).__name__}: no decoder layers found to shard (no _no_split_modules, no list of "
                         "alike layers)")
    return {type(max(lists, key=len)[0])}


def _trainable_leaf(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return not list(module.children()) and isinstance(weight, torch.Tensor) and weight.requires_grad


def auto_wrap_policy(model: torch.nn.Module) -> Callable:
    """Units: every trainable leaf (a LoRA linear) and every decoder layer; the rest stays in the root unit."""
    layers = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=decoder_layer_classes(model))
    lora = functools.partial(lambda_auto_wrap_policy, lambda_fn=_trainable_leaf)
    return functools.partial(_or_policy, policies=[lora, layers])


class ShardedModel(FSDP):
    """The root FSDP unit around the PEFT model, with what the run needs from a sharded adapter: its tensors whole
    (`gather_adapter`), loaded back (`load_adapter_`), their full shapes (`trainable_shapes`), the export
    (`save_pretrained`, from the copy gathered at the end of fit) and `generate`."""

    trainable_shapes: dict[str, torch.Size]
    _gathered: Optional[dict[str, torch.Tensor]] = None

    @classmethod
    def wrap(cls, model: torch.nn.Module, device: torch.device, **kwargs: Any) -> "ShardedModel":
        shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        kwargs.pop("use_orig_params", None)
        try:
            root = cls(model, auto_wrap_policy=auto_wrap_policy(model), device_id=device, use_orig_params=True,
                       mixed_precision=None, **kwargs)
        except ValueError as e:  # e.g. a model that keeps some weights in fp32 beside its bf16 ones in a layer
            raise ModelError(f"FSDP cannot shard this model: {str(e).splitlines()[0][:300]}") from None
        root.trainable_shapes = shapes
        units = root._lora_units()
        covered = {f"{prefix}.{n}" for prefix, unit in units for n, _ in unit.module.named_parameters()}
        if covered != set(shapes):
            raise ModelError(f"FSDP: trainable parameters outside a LoRA unit of their own: "
                             f"{sorted(set(shapes) - covered)[:3]}")
        return root

    def _lora_units(self) -> list[tuple[str, FSDP]]:
        """(the module's clean name, unit) of every unit that wraps a trainable leaf (a LoRA linear)."""
        return [(clean_tensor_name(name), m) for name, m in self.named_modules()
                if isinstance(m, FSDP) and m is not self and _trainable_leaf(m.module)]

    def _init_root(self) -> None:
        # FSDP decides which unit is the root at its first forward (or summon); a summon on an inner unit before
        # that would make the inner one a root
        from torch.distributed.fsdp._runtime_utils import _lazy_init

        _lazy_init(self, self)

    @torch.no_grad()
    def gather_adapter(self, keep: bool = False) -> dict[str, torch.Tensor]:
        """{PEFT name: whole tensor on the CPU} of the trainable tensors. Every rank calls this (all-gathers one
        LoRA unit at a time). keep: also kept for `save_pretrained` (the export, rank 0)."""
        self._init_root()
        out = {}
        for prefix, unit in self._lora_units():
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                for n, p in unit.module.named_parameters():
                    out[f"{prefix}.{n}"] = p.detach().to("cpu", copy=True)
        if keep:
            self._gathered = out
        return out

    @torch.no_grad()
    def load_adapter_(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write whole LoRA tensors {PEFT name: tensor} into every rank's shards (every rank calls this)."""
        self._init_root()
        for prefix, unit in self._lora_units():
            with FSDP.summon_full_params(unit, recurse=False, writeback=True):
                for n, p in unit.module.named_parameters():
                    p.copy_(state[f"{prefix}.{n}"])
        self._gathered = None

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The PEFT adapter folder, from the tensors gathered at the end of fit (this runs on rank 0 alone: it
        cannot all-gather)."""
        if self._gathered is None:
            raise ModelError("a sharded adapter is saved from the copy every rank gathers at the end of fit "
                             "(gather_adapter(keep=True) on every rank first)")
        return self.module.save_pretrained(save_directory, state_dict=self._gathered, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        """`generate` calls the model's inner forward: the root unit's weights (embeddings, head) are gathered
        around it; the decoder layers gather their own in their forwards. Every rank generates, and goes on with
        forwards until every rank's rows are done (synced_gpus: each decoding step is a collective)."""
        kwargs.setdefault("synced_gpus", dist.is_initialized() and dist.get_world_size() > 1)
        with FSDP.summon_full_params(self, recurse=False, writeback=False):
            return self.module.generate(*args, **kwargs)


def check_resume(path: Optional[str], meta: Mapping[str, Any], model: torch.nn.Module) -> None:
    """A checkpoint saved mid accumulation window resumes only under the kind of strategy that saved it: a sharded
    run saved each rank's gradient shards (by their names on the sharded model), an unsharded one each rank's whole
    gradients; the other kind would not find them."""
    window = meta.get("window")
    if not window:
        return
    names = [n for r in window.get("ranks", [window]) for n in r.get("grads", {})]
    saved = any("_fsdp_wrapped_module" in n for n in names)
    if names and saved != isinstance(model, ShardedModel):
        by, now = ((f"a sharded ({NAME})", "an unsharded") if saved else
                   ("an unsharded (DDP or one-process)", "a sharded"))
        raise ModelError(f"{path}: saved mid accumulation window by {by} run, resumed by {now} one: its partial "
                         "gradients would be lost. Resume with the strategy that saved it, or from a checkpoint saved "
                         "between optimizer steps (step=N.ckpt, last.ckpt)")


def trainable_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """{PEFT name: whole shape} of the trainable tensors, sharded or not."""
    if isinstance(model, ShardedModel):
        return dict(model.trainable_shapes)
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


# -- the step -----------------------------------------------------------------------------------------------------
def grad_norm(grads: list[torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients. Unsharded: the norm of `grads` (as torch's clip_grad_norm_ computes it).
    Sharded: every rank holds its shards of the gradients (each element on exactly one rank of the shard group), so
    the squared norms of the local shards are all-reduced: every rank gets the same norm, clips by the same factor
    and skips (non-finite) the same steps."""
    if not isinstance(model, ShardedModel):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads])))
    if grads:
        local = torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
    else:  # (a rank may hold no part of any LoRA tensor)
        local = torch.zeros((), dtype=torch.float32, device=model.compute_device)
    dist.all_reduce(local, group=model.process_group)
    return local.sqrt()


def gather_window(model: "ShardedModel", window: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every rank's window counters and its shards of the gradients accumulated so far (each micro-batch's were
    reduce-scattered already: rank r's shard is its own to get back), keyed by the parameter's name on this model
    (the module restores them by `self.model.named_parameters()`), for a checkpoint saved mid-window. Every rank
    calls this."""
    mine = {k: float(torch.as_tensor(window[k]).double()) for k in ("loss", "tokens", "all_tokens")}
    mine["micro"] = int(window["micro"])
    mine["grads"] = {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                     if p.requires_grad and p.grad is not None}
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks


# -- checks and the backend plan ------------------------------------------------------------------------------------
def strategy_of(trainer: Any, hp: Mapping[str, Any], compute_dtype: torch.dtype) -> Optional[QLoRAFSDPStrategy]:
    """The run's FSDP-QLoRA strategy, or None if it does not shard; ConfigError (before anything loads) for what
    cannot work under FSDP."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if not isinstance(strategy, FSDPStrategy):
        return None
    if not isinstance(strategy, QLoRAFSDPStrategy):
        raise ConfigError(f"trainer.strategy: Lightning's FSDPStrategy would wrap the LightningModule whole (LoRA "
                          f"fp32 and 4-bit base in one unit); use --trainer.strategy {NAME} (finllm_pl.fsdp."
                          "QLoRAFSDPStrategy, configs/fsdp.yaml)")
    if hp["merge_for_labeling"]:
        raise ConfigError(f"model.merge_for_labeling: not under {NAME} (folding the adapter into sharded base weights "
                          "is not done); label without it or on one GPU / DDP")
    if hp["chunk_tokens"] is not None:
        raise ConfigError(f"model.chunk_tokens: not under {NAME} (ranks would split their micro-batches into different "
                          "numbers of chunks, and each chunk's forward is a collective under FSDP); use a smaller "
                          "data.batch_size or model.gradient_checkpointing")
    if hp["use_dora"]:
        raise ConfigError(f"model.use_dora: not under {NAME} (DoRA reads the LoRA weights outside their FSDP units' "
                          "forwards, where they are shards)")
    precision = str(trainer.precision)
    if precision.endswith("-true"):
        casts = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
        if casts is not None and casts != compute_dtype and hp["quantization"] != "none":
            raise ConfigError(f"trainer.precision={precision} casts every parameter to {casts}, the {compute_dtype} "
                              f"storage of the 4-bit weights too (other numbers); use bf16-mixed, or "
                              f"model.compute_dtype {str(casts).removeprefix('torch.')}")
    return strategy


def plan(name: str, shape: Any, skip: Iterable[str] = (), world_size: int = 1, precision: str = "32-true",
         gradient_checkpointing: bool = False, agree: Optional[Callable[[bool], bool]] = None):
    """backend.plan for a sharded model: the components in NOT_SHARDED step aside with their reason (before the
    self-check: its stand-in is not sharded, so its verdict on them would not hold for this run); the others
    (`kernels`, `folded_attention`: forwards of modules inside a unit, whose weights are whole there) are
    self-checked as on one GPU, and their verdict holds: sharding changes where the weights live between forwards,
    not what a forward computes."""
    from . import backend as backends

    if name == "plain":
        return backends.Decision()
    skip = set(skip)
    decision = backends.plan(name, shape, skip | set(NOT_SHARDED), world_size, precision, gradient_checkpointing,
                             agree)
    for c, why in NOT_SHARDED.items():
        if c not in skip:
            decision.off[c] = f"{NAME} shards the model: {why}"
    return decision


def describe_units(model: "ShardedModel") -> dict[str, int]:
    """How many FSDP units of each kind the model has (for logs and tests)."""
    units = [m for m in model.modules() if isinstance(m, FSDP)]
    lora = sum(_trainable_leaf(m.module) for m in units if m is not model)
    return {"units": len(units), "lora": lora, "layers": len(units) - 1 - lora}
