"""The fixed-shape training step (fast components `static_step` and `cuda_graphs`; plain torch + transformers).

Why: a QLoRA step of a 1.5B model at micro-batch 32 launches ~7,000 small kernels and the GPU waits for Python to
launch them. A CUDA graph records one step's kernels once and replays them with one launch (a step 0.25-0.30 s ->
0.075 s on an H100). A graph replays fixed shapes at fixed addresses, so each micro-batch is made static on the CPU,
in the DataLoader (`StaticCollate`): lengths padded to a few buckets (`static_length`), the attention mask explicit
(HF's own mask code inspects padding on the CPU, a sync a capture forbids), the supervised positions as a fixed
number of (position, target, weight) slots per row. The prompt prefix every row starts with (template + instruction)
runs once, packed in front of the rows in one sequence whose attention keeps the rows apart
(`packed_prefix_attention`): fewer tokens, the same math (with LoRA dropout the rows share the prefix's mask).
The step computes the summed token loss and the LoRA gradients (`torch.autograd.grad`), which are added into
`p.grad` outside it: accumulation, clipping, the optimizer and the schedule stay the trainer's. One graph per shape,
captured the first time that shape comes; the first capture is checked against the eager step it follows (one
replay on the same batch) and graphs are switched off, with a warning, if they differ. Off CUDA the same static
step runs eagerly.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from ..batching import collate_train
from ..errors import ModelError
from .plain import decoder_call, row_chunks
from .tree import Head, layer_masks

PACKED_ATTENTION = "finllm_packed_prefix"  # the name packed_prefix_attention is registered under with transformers


# -- the batch layout (built in the DataLoader's workers) ----------------------------------------------------------
def static_length(n: int) -> int:
    """The padded length of a static batch: 16, 24, ..., 64 (steps of 8), then 80, 96, ..., 128 (16), 160, ...
    (32): at most ~1/4 of a power of two of padding, and few distinct shapes (each one is a captured graph)."""
    if n <= 16:
        return 16
    step = max(8, 1 << ((n - 1).bit_length() - 3))
    return -(-n // step) * step


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """Tokens that every (right-padded) row starts with, ending before the first supervised position of any row
    (the prefix's hidden states then never need logits)."""
    B, L = input_ids.shape
    same = ((input_ids == input_ids[:1]) & attention_mask.bool()).all(0)
    shared = int(same.long().cumprod(0).sum())
    sup = labels[:, 1:] != -100  # hidden state t predicts token t + 1
    first = torch.where(sup.any(1), sup.float().argmax(1), torch.full((B,), L - 1)).min()
    return min(shared, int(first))


def static_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 shared_prefix: int = 0, rows: int = 0) -> dict[str, torch.Tensor]:
    """Fixed-shape copies (`g_*`) of a right-padded training batch.

    With `shared_prefix` > 0 and at least that many tokens common to every row, those tokens go once into `g_pre`
    [1, P] and the rows hold only what follows. The rest: the rows' length padded to `static_length`, a causal +
    padding mask [B, S, P + S], position ids continuing after the prefix, and the supervised positions as a
    power-of-two number of (position, target, weight) slots per row. A batch of fewer than `rows` rows (an epoch's
    short last one) is filled up with copies of its last row that carry no supervised token (weight 0: the same loss
    and gradients), so that it replays a full batch's graph instead of capturing one of its own."""
    if input_ids.shape[0] < rows:
        fill = rows - input_ids.shape[0]
        input_ids, attention_mask = (torch.cat([t, t[-1:].expand(fill, -1)]) for t in (input_ids, attention_mask))
        labels = torch.cat([labels, labels.new_full((fill, labels.shape[1]), -100)])
    B, L = input_ids.shape
    P = shared_prefix_length(input_ids, attention_mask, labels) if shared_prefix > 0 else 0
    P = P if P >= shared_prefix else 0
    S = static_length(L - P)
    pad = S - (L - P)
    ids = F.pad(input_ids[:, P:], (0, pad), value=0)  # padding is masked out and unsupervised: any id will do
    real = F.pad(attention_mask[:, P:], (0, pad), value=0).bool()
    target = F.pad(labels[:, P:], (0, pad), value=-100)[:, 1:]  # [B, S - 1]: suffix token t predicts t + 1
    sup = target != -100
    n_sup = int(sup.sum(1).max()) if B else 0
    slots = max(4, 1 << max(n_sup - 1, 0).bit_length())  # a power of two: few distinct shapes
    # the supervised positions of each row first (in order), then unsupervised ones with weight 0
    order = torch.argsort((~sup).long() * S + torch.arange(S - 1), dim=1, stable=True)[:, :slots]
    visible = torch.ones(S, S, dtype=torch.bool).tril()[None] & real[:, None, :]
    out = {"g_ids": ids, "g_pos": (P + torch.arange(S)).expand(B, S).contiguous(), "g_idx": order,
           "g_tgt": target.gather(1, order).clamp(min=0), "g_w": sup.gather(1, order).float()}
    if P:
        out["g_pre"] = input_ids[:1, :P].clone()
        visible = torch.cat([visible.new_ones(B, S, P), visible], 2)
    out["g_mask"] = visible
    return out


def pad_static_length(st: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A static batch with its rows padded on the right to `length` tokens: padding ids, positions continuing, and a
    mask under which the real tokens see what they saw and each new position sees its row's real tokens (a query
    that sees nothing would be NaN in the masked attention, and NaN times a zero weight is still NaN)."""
    S = st["g_ids"].shape[1]
    if length <= S:
        return st
    extra = length - S
    pos, mask = st["g_pos"], F.pad(st["g_mask"], (0, extra))
    return {**st, "g_ids": F.pad(st["g_ids"], (0, extra)),
            "g_pos": torch.cat([pos, pos[:, -1:] + torch.arange(1, extra + 1, device=pos.device)], 1),
            "g_mask": torch.cat([mask, mask[:, -1:].expand(-1, extra, -1)], 1)}


class StaticCollate:
    """The DataLoader's collate when the static step runs: the plain batch and its fixed-shape copies."""

    def __init__(self, pad_id: int, shared_prefix: int, rows: int) -> None:
        self.pad_id, self.shared_prefix, self.rows = pad_id, shared_prefix, rows

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_train(rows, self.pad_id)
        batch.update(static_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], self.shared_prefix,
                                  self.rows))
        return batch


# -- the shared prefix packed in front of the rows ---------------------------------------------------------------
def packed_prefix_attention(module, query, key, value, attention_mask, prefix_rows=None, **kwargs):
    """Attention over one packed sequence [shared prefix (P tokens) | row 1 | ... | row B] (each row S tokens):
    the prefix attends causally to itself, each row to the prefix and (through `attention_mask`, [B, 1, S, P + S],
    or on CUDA flash attention's bottom-right causal mask) to its own earlier tokens, never to another row.
    Everything else in a decoder layer is per token, so one pass runs the prefix's layers together with the rows'.
    Called by transformers' attention layers (AttentionInterface) with query [1, H, P + B*S, D] and key/value
    [1, KV heads, P + B*S, D], rotary embedding applied."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not torch.compiler.is_compiling():  # (a traced counter would recompile at every call)
        packed_prefix_attention.calls += 1
    P, B = prefix_rows
    kwargs.pop("is_causal", None)
    window = kwargs.get("sliding_window")
    # split, not slices: the backward of a slice zero-fills a whole-size gradient and copies into it (per slice)
    (q_pre, q_rows), (k_pre, k_rows), (v_pre, v_rows) = (t.split([P, t.shape[2] - P], 2) for t in (query, key, value))

    def rows(t):  # [1, h, B*S, D] -> [B, h, S, D] (a view)
        return t.unflatten(2, (B, -1)).squeeze(0).transpose(0, 1)

    def with_prefix(pre, t):  # each row's keys/values: the prefix's (shared, expanded), then its own
        return torch.cat([pre.expand(B, -1, -1, -1), rows(t)], 2)

    pre_mask, causal = None, True
    if window and P > window:  # the prefix's own attention within the window
        i = torch.arange(P, device=query.device)
        pre_mask, causal = ((i[:, None] >= i[None]) & (i[:, None] - i[None] < window))[None, None], False
    pre, _ = sdpa_attention_forward(module, q_pre, k_pre, v_pre, pre_mask, is_causal=causal, **kwargs)
    q, k, v = rows(q_rows), with_prefix(k_pre, k_rows), with_prefix(v_pre, v_rows)
    if _flash_rows(q, k, v, kwargs):
        # The rows are right-padded: a real token's keys are the prefix and its row's tokens up to itself, a causal
        # mask aligned to the bottom right (padded keys all come after the real queries), which is flash
        # attention's own causal mask when there are fewer queries than keys (torch's CausalBias(LOWER_RIGHT)):
        # no mask to read, the fastest kernel (later epochs 14.0 -> 13.3 s on an H100, docs/performance.md).
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=kwargs.get("scaling"))[0]
        out = out.transpose(1, 2)
    else:
        out, _ = sdpa_attention_forward(module, q, k, v, attention_mask, is_causal=False, **kwargs)
    return torch.cat([pre, out.reshape(1, -1, *out.shape[2:])], 1), None  # [1, P + B*S, H, D]


packed_prefix_attention.calls = 0


def _flash_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict) -> bool:
    """Whether the rows' attention can run as flash attention's bottom-right causal kernel (CUDA, bf16/fp16, a
    head size it has, no dropout, no window, no soft-capping, flash not switched off)."""
    if not q.is_cuda or kwargs.get("dropout") or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return False
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, True)  # (mask, dropout, causal, GQA)
    return torch.backends.cuda.can_use_flash_attention(params)


@contextmanager
def _packed_attention(config):
    """This model's attention implementation is packed_prefix_attention while the step runs (its attention layers
    look it up by name at every call; the setting is the model's own, no other model or thread sees it)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_prefix_attention)  # (a named entry: the same each time)
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def static_hidden(head: Head, st: dict[str, torch.Tensor], call: Callable = decoder_call) -> torch.Tensor:
    """The rows' last hidden states [B, S, hidden] of a static batch: with a shared prefix (`g_pre`), one decoder
    pass over the packed tokens; else the rows under their explicit mask. `call(decoder, **kwargs)` runs the
    decoder (StaticStep's may swap in compute-dtype adapter weights)."""
    ids, pos = st["g_ids"], st["g_pos"]
    B, S = ids.shape
    pre = st.get("g_pre")
    P = 0 if pre is None else pre.shape[1]
    k_pos = pos if not P else torch.cat([torch.arange(P, device=ids.device).expand(B, P), pos], 1)
    mask = layer_masks(st["g_mask"], pos, k_pos, head.config, head.decoder, head.mask_dtype)
    if not P:
        return call(head.decoder, input_ids=ids, position_ids=pos, use_cache=False, attention_mask=mask
                    ).last_hidden_state
    tokens = torch.cat([pre, ids.reshape(1, B * S)], 1)
    packed_pos = torch.cat([torch.arange(P, device=ids.device)[None], pos.reshape(1, B * S)], 1)
    calls = packed_prefix_attention.calls
    with _packed_attention(head.decoder.config):
        hidden = call(head.decoder, input_ids=tokens, position_ids=packed_pos, prefix_rows=(P, B), use_cache=False,
                      attention_mask=mask).last_hidden_state
    if packed_prefix_attention.calls == calls:
        raise ModelError(f"{type(head.decoder).__name__}: its attention layers do not go through transformers' "
                         "AttentionInterface, which the shared-prefix training step needs; set data.shared_prefix 0")
    return hidden.split([P, B * S], 1)[1].reshape(B, S, -1)


def static_loss(head: Head, st: dict[str, torch.Tensor], call: Callable = decoder_call) -> tuple[torch.Tensor, Any]:
    """(summed token loss, supervised tokens) of a static batch: the head on the supervised slots only."""
    hidden = static_hidden(head, st, call)
    h = hidden.gather(1, st["g_idx"][..., None].expand(-1, -1, hidden.shape[-1]))
    ce = F.cross_entropy(head(h.reshape(-1, h.shape[-1])).float(), st["g_tgt"].reshape(-1), reduction="none")
    return (ce * st["g_w"].reshape(-1)).sum(), st["g_w"].sum()


# -- the step, eagerly or from CUDA graphs ------------------------------------------------------------------------
class StaticStep:
    """`(loss_sum, n_supervised)` of a static micro-batch, its LoRA gradients added into `p.grad`.
    `modules()`: the context the step's forward runs in (the fast backend's module forwards and autocast)."""

    def __init__(self, model, head: Head, compute_dtype: torch.dtype, modules: Callable[[], ContextManager],
                 use_graphs: bool, max_tokens: Optional[int] = None):
        self.model, self.head, self.modules = model, head, modules
        self.max_tokens = max_tokens  # longer micro-batches run as row chunks
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dtype = compute_dtype
        # Under autocast every LoRA matmul casts its fp32 weight to bf16 (and its gradient back): 448 small copy
        # kernels per step for the 1.5B model. One cast of all of them at the step's start is the same numbers.
        named = [(n, p) for n, p in head.decoder.named_parameters() if p.requires_grad]
        self.adapter_names = [n for n, _ in named]
        self.cast_adapter_once = (compute_dtype != torch.float32 and len(named) == len(self.params) and
                                  all(".lora_A." in n or ".lora_B." in n for n in self.adapter_names))
        self.use_graphs = use_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.grads: Optional[list[torch.Tensor]] = None  # gradient buffers the optimizer reads (p.grad)

    def _call(self) -> Callable:
        """How the step calls the decoder: as it is, or (cast_adapter_once) with every LoRA weight replaced by its
        compute-dtype copy, made by one cast of them all (gradients flow back through it to the fp32 weights)."""
        if not self.cast_adapter_once:
            return decoder_call
        low = torch.cat([p.reshape(-1) for p in self.params]).to(self.dtype).split([p.numel() for p in self.params])
        swap = {n: t.view_as(p) for n, t, p in zip(self.adapter_names, low, self.params)}
        return lambda decoder, **kwargs: torch.func.functional_call(decoder, swap, (), kwargs, strict=False)

    def loss_and_grads(self, st: dict[str, torch.Tensor]):
        with self.modules():
            loss, n = static_loss(self.head, st, self._call())
        grads = torch.autograd.grad(loss, self.params)
        return loss.detach(), n, grads

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        st = {k: v for k, v in batch.items() if k.startswith("g_")}
        rows, length = st["g_ids"].shape
        loss = n = None
        parts = row_chunks(rows, length, self.max_tokens)
        if len(parts) > 1:
            # The few micro-batches that run as chunks come in many lengths, each a capture serving a batch or two
            # per epoch: padded to a power of two (at most what keeps the chunks within max_tokens), they share two.
            padded = min(1 << (length - 1).bit_length(), self.max_tokens // (parts[0].stop - parts[0].start))
            st = pad_static_length(st, padded)
        for part in parts:
            chunk = st if len(parts) == 1 else {k: v if k == "g_pre" else v[part] for k, v in st.items()}
            part_loss, part_n, grads = self._replay(chunk)
            self._accumulate(grads)
            # cloned/added before the next replay overwrites the graph's outputs
            loss, n = (part_loss.clone(), part_n.clone()) if loss is None else (loss + part_loss, n + part_n)
        return loss, n

    def _replay(self, st: dict[str, torch.Tensor]):
        if not self.use_graphs:
            return self.loss_and_grads(st)
        key = (tuple(st["g_mask"].shape), st["g_idx"].shape[1])  # (rows, length, prefix + length), slots
        if key not in self.graphs:
            return self._capture(key, st)
        graph, static, out = self.graphs[key]
        for k, v in st.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, key, st):
        static = {k: v.clone() for k, v in st.items()}  # the graph's own input buffers
        if self.graphs:
            # An earlier shape already ran eagerly (kernels loaded, library handles made): this one is captured at
            # once and replayed for its result, without an eager step of its own (most of a capture's cost).
            out = self._record(key, static)
            self.graphs[key][0].replay()
            return out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # this batch's real step, eagerly (also the warm-up before capturing)
            eager = self.loss_and_grads(static)
        torch.cuda.current_stream().wait_stream(side)
        out = self._record(key, static)
        self.graphs[key][0].replay()  # the graph proves itself on this batch: the eager step's loss and gradients
        if not _close(out, eager):
            warnings.warn("model.backend fast: the CUDA-graph step did not reproduce the eager step on this model "
                          "(cuda_graphs switched off for this run; the fixed-shape step runs eagerly)", stacklevel=2)
            self.use_graphs, self.graphs, self.pool = False, {}, None
        return eager

    def _record(self, key, static):
        """Captures the step on `static`'s buffers into a graph of the shared pool; its outputs (not yet computed)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps allocating pinned buffers while this thread
        # captures; under the default "global" mode any such call from any thread invalidates the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.loss_and_grads(static)
        self.pool = graph.pool()
        self.graphs[key] = (graph, static, out)
        return out

    def _accumulate(self, grads) -> None:
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        if all(p.grad is None for p in self.params):  # first micro-batch of a window: the buffers start over
            torch._foreach_copy_(self.grads, list(grads))
            for p, g in zip(self.params, self.grads):
                p.grad = g
        elif all(p.grad is not None for p in self.params):
            torch._foreach_add_([p.grad for p in self.params], list(grads))
        else:  # some parameters got no gradient earlier in the window (not the case for LoRA; kept correct)
            for p, g in zip(self.params, grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)


def _close(a, b) -> bool:
    """The graph's (loss, n, grads) against the eager step's: equal up to the order of floating-point sums."""
    (la, na, ga), (lb, nb, gb) = a, b
    if not torch.equal(na, nb) or not torch.allclose(la.float(), lb.float(), rtol=1e-3, atol=1e-3):
        return False
    return all(torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-5) for x, y in zip(ga, gb))
