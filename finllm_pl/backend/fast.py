"""The fast backend: the plain backend's results from fewer, larger kernels. Each component can be on or off; which
are on for a run is decided by selfcheck.py, which compares each against the plain backend on a stand-in of the
run's architecture (same config, a layer or two, random weights) on the run's device and dtype.

Components (docs/performance.md has what each one buys):
  sparse_head       the LM head only at the positions that need logits (tree.py)
  label_tree        every label scored in one decoder pass over [prompt | label tree] (tree.py)
  prefix_reuse      the prompts' shared prefix run once, its KV cache reused by every batch (tree.py)
  static_step       fixed-shape training batches, the shared prefix packed in front of the rows (static.py)
  cuda_graphs       the static step replayed from CUDA graphs (static.py; one GPU)
  lora_groups       the attention's LoRA linears in fewer kernels, q/k/v as one matmul (lora.py)
  kernels           RMSNorm, SiLU-gated MLP and rotary embedding in fused kernels (kernels.py)
  folded_attention  label scoring's grouped query heads without repeated keys/values (attention.py; CUDA)
  dequantize        the 4-bit base held dequantized for the run (transformers' own dequantize; +2 bytes a weight;
                    done when the model is loaded, model.build)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

import torch

from .attention import folded_attention
from .kernels import fused_rope, layer_forwards
from .lora import group_forwards, lora_groups
from .plain import PlainBackend, row_chunks
from .static import StaticCollate, StaticStep
from .tree import Head, score_labels_tree, sparse_loss_sum

COMPONENTS = ("dequantize", "sparse_head", "label_tree", "prefix_reuse", "static_step", "cuda_graphs", "lora_groups",
              "kernels", "folded_attention")
REQUIRES = {"label_tree": ("sparse_head",), "prefix_reuse": ("label_tree",), "static_step": ("sparse_head",),
            "cuda_graphs": ("static_step",)}
MIN_PREFIX = 8  # label scoring runs a shared prefix once when it is at least this many tokens


def closure(components: Iterable[str]) -> set[str]:
    """The components with everything they need."""
    out, todo = set(), list(components)
    while todo:
        c = todo.pop()
        if c not in out:
            out.add(c)
            todo += REQUIRES.get(c, ())
    return out


@contextlib.contextmanager
def module_forwards(model: torch.nn.Module, forwards: dict, uncast_lora_input: bool = False,
                    skip_cudnn_attention: bool = False, rope: bool = False) -> Iterator[None]:
    """The given modules' forwards in place for a while (those modules of this model only), and with `rope` the
    rotary kernel on in this thread. uncast_lora_input (under low-precision autocast): LoRA layers take their input
    as it is (peft casts it to the adapter's fp32, then autocast casts it back: the same numbers at two extra copies).
    skip_cudnn_attention (CUDA): SDPA picks flash, memory-efficient or math kernels, not cuDNN's, which builds an
    execution plan for every new shape (every labeling batch and captured step has its own)."""
    from peft.helpers import disable_input_dtype_casting
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for m, forward in forwards.items():
        m.forward = forward
    try:
        with contextlib.ExitStack() as stack:
            if rope:
                stack.enter_context(fused_rope())
            stack.enter_context(disable_input_dtype_casting(model, active=uncast_lora_input))
            if skip_cudnn_attention:
                stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]))
            yield
    finally:
        for m in forwards:
            del m.forward  # back to the class's own


class FastBackend(PlainBackend):
    name = "fast"

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype, components: Iterable[str],
                 chunk_tokens: Optional[int] = None, shared_prefix: int = 8) -> None:
        super().__init__(model, compute_dtype, chunk_tokens)
        on = set(components)
        self.on = {c: c in on for c in COMPONENTS}
        self.enabled = dict(self.on)
        self.shared_prefix = shared_prefix
        self.head = Head(model)
        decoder = self.head.decoder
        self.groups = lora_groups(decoder) if self.on["lora_groups"] else []
        layer_fwds, self.rope = layer_forwards(decoder) if self.on["kernels"] else ({}, [])
        self.forwards = {**group_forwards(self.groups), **layer_fwds}
        self.step = None
        if self.on["static_step"]:
            device = next(model.parameters()).device
            self.step = StaticStep(model, self.head, compute_dtype, self._step_modules,
                                   use_graphs=self.on["cuda_graphs"] and device.type == "cuda", max_tokens=chunk_tokens)
        self.prefix_memo: dict = {}  # label scoring's prefix KV caches, until the weights change

    def describe(self) -> str:
        on = [c for c, v in self.on.items() if v]
        return "fast: " + (", ".join(on) if on else "no component")

    # -- module forwards ----------------------------------------------------------------------------------------
    def modules(self, uncast_lora_input: bool = False, skip_cudnn_attention: bool = False) -> ContextManager:
        """This backend's module forwards in place for a while (module_forwards)."""
        return module_forwards(self.model, self.forwards, uncast_lora_input, skip_cudnn_attention, bool(self.rope))

    def _step_modules(self) -> ContextManager:
        """The static step's context: the module forwards and its own autocast (no weight cache: a CUDA graph must
        record the casts)."""
        stack = contextlib.ExitStack()
        low = self.dtype != torch.float32
        dev = next(self.model.parameters()).device.type
        stack.enter_context(self.modules(uncast_lora_input=low, skip_cudnn_attention=dev == "cuda"))
        stack.enter_context(torch.autocast(dev, dtype=self.dtype, enabled=low, cache_enabled=False))
        return stack

    # -- training -------------------------------------------------------------------------------------------------
    def train_collate(self, pad_id: int, rows: int) -> Callable:
        if self.step is None:
            return super().train_collate(pad_id, rows)
        return StaticCollate(pad_id, self.shared_prefix, rows)

    def train_step(self, batch: dict[str, torch.Tensor], backward: Callable[[torch.Tensor], None],
                   sync: Callable[[bool], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step is not None and "g_ids" in batch:  # (one process: the backend is made without it under DDP)
            return self.step(batch)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        parts = row_chunks(*ids.shape, self.chunk_tokens)
        loss = n = 0
        for i, part in enumerate(parts):
            # backward inside modules() too: gradient checkpointing runs the forwards again there
            with sync(i == len(parts) - 1), self.modules():
                part_loss, part_n = self.loss_sum(ids[part], mask[part], labels[part])
                backward(part_loss)
            loss, n = loss + part_loss.detach(), n + part_n
        return loss, n

    def loss_sum(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        if self.on["sparse_head"]:
            return sparse_loss_sum(self.head, input_ids, attention_mask, labels)
        return super().loss_sum(input_ids, attention_mask, labels)

    # -- labeling -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def labeling(self) -> Iterator[None]:
        """Validation and predict: the module forwards (LoRA input uncast under bf16/fp16 autocast), attention off
        cuDNN on CUDA, grouped query heads folded (folded_attention), a fresh prefix memo."""
        device = next(self.model.parameters()).device
        low = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) != torch.float32
        self.prefix_memo = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.modules(uncast_lora_input=low, skip_cudnn_attention=device.type == "cuda"))
            if self.on["folded_attention"]:
                stack.enter_context(folded_attention(self.head.config))
            yield

    def weights_changed(self) -> None:
        for group in self.groups:
            group.invalidate()
        self.prefix_memo = {}

    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        if not self.on["label_tree"]:
            return super().score(batch)
        return score_labels_tree(self.head, batch["prompt_ids"], batch["prompt_mask"], batch["label_ids"],
                                 batch["label_mask"], min_prefix=MIN_PREFIX if self.on["prefix_reuse"] else 0,
                                 prefix_memo=self.prefix_memo, prefix=batch.get("prefix_ids"))
