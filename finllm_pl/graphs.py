"""The training step's forward + backward replayed from CUDA graphs (plain torch; the LightningModule calls it).

Why: a QLoRA step of a 1.5B model at micro-batch 32 launches ~7,000 small kernels (peft and bitsandbytes work
module by module) and the GPU sits idle most of the time waiting for Python to launch them. A CUDA graph records
the kernels of one step once and replays them with one launch. Measured on an H100: 0.075 s per step instead of
~0.25-0.30 s (benchmarks/gpu_throughput.py, `project_graphs`); one real epoch through the CLI 117.6 s eager,
24.7 s then 14.5 s with the fast config (benchmarks/fit_epoch.py), the same per-step losses.

A graph replays fixed shapes and fixed addresses, so every micro-batch is first made static on the CPU
(finllm_pl.data.static_batch, in the DataLoader, when data.static_batches is on, which model.cuda_graphs
turns on): lengths padded up to a few bucket sizes (16, 24, ..., 64, 80, ...: `static_length`), the attention
mask as an explicit 4D causal + padding mask (HF's own mask code inspects padding on the CPU, a sync a capture
forbids), and the supervised positions as a fixed number of (position, target, weight) slots per row instead of
a boolean gather whose size depends on the data. The prompt prefix every row of the micro-batch starts with
(template + instruction; data.shared_prefix) runs once, packed in front of the rows in one sequence whose
attention keeps the rows apart (packed_prefix_attention), its keys/values serving every row and gradients
flowing back through them: fewer tokens, the same math; with LoRA dropout the rows share that prefix's dropout
mask. (Run as a separate batch-1 pass first, the prefix doubled the step's kernel count: 25.2 -> 17.9 s per
epoch packed.) One graph per (rows, prefix, length, slots) shape, captured the first time that shape comes: the
first shape right after that batch's own eager step (the CUDA-graph docs warm up before capturing: it compiles
and makes the library handles), every later one at once, then replayed for its result (its eager step cost
0.3-0.5 s of each capture: the first epoch 33.2 -> 29.4 s on an H100; an epoch's short last batch is filled up
to the full rows and adds no shape). All graphs share one memory pool, as they never run at the same time.
Under bf16 autocast all LoRA weights are cast once per step and the LoRA layers take their bf16 input uncast:
the same numbers with ~450 fewer copy kernels (14.9 -> 14.4 s). The attention's LoRA linears run as fused.py's
forwards (q/k/v as one matmul, LoRA's A's batched, B's matmul adding into the base output): 14.5-14.7 -> 14.0-14.1 s.
Attention stays off cuDNN (fast_modules): cuDNN compiles and plans its kernels for every new shape, which made
the first epoch 27.3 s instead of 20.4 s (first step 9.4 vs 4.4 s, later captures 4.8 vs 2.5 s) for epochs
0.1-0.2 s slower after (14.3 / 13.9 vs 14.4 / 14.1 s; results/gpu/fit_epoch_{cudnn_baseline,nocudnn}.json).

The graph computes the summed token loss and the LoRA gradients (`torch.autograd.grad`); they are added into
`p.grad` outside it, so accumulation, clipping, the optimizer and the LR schedule stay the trainer's own.
A micro-batch of more padded tokens than model.chunk_tokens runs as row chunks (each its own graph shape), so
micro-batch 32 fits in 11.4 GiB although its longest batches would need 23.9. With model.compile_layers the
norms' and MLPs' kernels are torch.compile'd ones (fused elementwise work: 17.8 -> 14.9 s per epoch, and the
first epoch, compiling included, 28.9 -> 25.5 s as every capture has fewer kernels to record). model.fused_layers
gets the same kernels' speed with nothing to compile (finllm_pl/kernels.py; first epoch 21.2 -> 16.5-16.7 s).
Off CUDA (tests) the same static computation runs eagerly.
"""

from __future__ import annotations

import types
from contextlib import ExitStack, contextmanager
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .data import pad_static_length
from .errors import ModelError
from .fused import fused_forwards
from .kernels import fused_layer_forwards
from .model import split_head
from .scoring import _decoder_call, attention_mask_4d, mask_dtype

PACKED_ATTENTION = "finllm_packed_prefix"  # the attention function packed_prefix_attention registers with transformers


def packed_prefix_attention(module, query, key, value, attention_mask, prefix_rows=None, **kwargs):
    """Attention over one packed sequence [shared prefix (P tokens) | row 1 | ... | row B] (each row S tokens):
    the prefix attends causally to itself, each row to the prefix and (through `attention_mask`, [B, 1, S, P + S],
    or on CUDA flash attention's causal mask) to its own earlier tokens, never to another row. Everything else in
    a decoder layer is per token, so one pass over the packed tokens runs the prefix's layers together with the
    rows' instead of as a second batch-1 pass of its own: half the kernels of a step. Called by transformers'
    attention layers (registered with AttentionInterface) with query [1, H, P + B*S, D] and key/value
    [1, KV heads, P + B*S, D], RoPE applied."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not torch.compiler.is_compiling():  # (a traced counter would recompile at every call)
        packed_prefix_attention.calls += 1
    P, B = prefix_rows
    kwargs.pop("is_causal", None)

    # split, not slices: the backward of a slice zero-fills a whole-size gradient and copies into it (per slice)
    (q_pre, q_rows), (k_pre, k_rows), (v_pre, v_rows) = (t.split([P, t.shape[2] - P], 2) for t in (query, key, value))

    def rows(t):  # [1, h, B*S, D] -> [B, h, S, D] (a view)
        return t.unflatten(2, (B, -1)).squeeze(0).transpose(0, 1)

    def with_prefix(pre, t):  # each row's keys/values: the prefix's (shared, expanded), then its own
        return torch.cat([pre.expand(B, -1, -1, -1), rows(t)], 2)

    pre, _ = sdpa_attention_forward(module, q_pre, k_pre, v_pre, None, is_causal=True, **kwargs)
    q, k, v = rows(q_rows), with_prefix(k_pre, k_rows), with_prefix(v_pre, v_rows)
    if _flash_rows(q, k, v, kwargs):
        # The rows are right-padded (data.static_batch): a real token's keys are the prefix and its row's tokens up
        # to itself, a causal mask aligned to the bottom right (padded keys all come after the real queries; padded
        # queries, never supervised, see them too). That is flash attention's own causal mask when there are fewer
        # queries than keys, as torch's CausalBias(LOWER_RIGHT) runs it (not CausalBias itself: it cannot be made
        # under a TorchDispatchMode such as FlopCounterMode): no [B, 1, S, P + S] mask to read, the fastest
        # kernel (later epochs 14.0 -> 13.3 s and 14.4 -> 13.9 s, peak 9.4 -> 8.9 GiB, the same losses;
        # results/gpu/fit_epoch_flash*.json).
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=kwargs.get("scaling"))[0]
        out = out.transpose(1, 2)
    else:
        out, _ = sdpa_attention_forward(module, q, k, v, attention_mask, is_causal=False, **kwargs)
    return torch.cat([pre, out.reshape(1, -1, *out.shape[2:])], 1), None  # [1, P + B*S, H, D]


def _flash_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict) -> bool:
    """Whether the rows' attention can run as flash attention's bottom-right causal kernel (CUDA, bf16/fp16, a
    head size it has, no attention dropout, flash not switched off)."""
    if not q.is_cuda or kwargs.get("dropout") or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return False
    # is_causal off, as CausalBias asks: SDPA's check refuses is_causal for fewer queries than keys, because SDPA's
    # own causal mask is the top-left one
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, True)  # (mask, dropout, causal, GQA)
    return torch.backends.cuda.can_use_flash_attention(params)


packed_prefix_attention.calls = 0


@contextmanager
def _packed_attention(config):
    """The model's attention implementation switched to packed_prefix_attention for a while (the attention layers
    look it up by name at every call)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_prefix_attention)  # (again: a dict entry)
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def packed_prefix_hidden(decoder, st: dict[str, torch.Tensor], mdt: torch.dtype, call=_decoder_call) -> torch.Tensor:
    """The rows' last hidden states [B, S, hidden] of a static micro-batch with a shared prefix (`g_pre`), from
    one decoder pass over the packed tokens (packed_prefix_attention): the same math as running the prefix
    first and the rows on its KV cache, in one pass. The prefix's LoRA dropout mask is drawn once and shared
    by every row, as on that cache. `call(decoder, **kwargs)` runs the decoder (GraphedLossBackward's may swap
    in compute-dtype adapter weights)."""
    pre, ids = st["g_pre"], st["g_ids"]
    (B, S), P = ids.shape, pre.shape[1]
    tokens = torch.cat([pre, ids.reshape(1, B * S)], 1)
    positions = torch.cat([torch.arange(P, device=ids.device)[None], st["g_pos"].reshape(1, B * S)], 1)
    calls = packed_prefix_attention.calls
    with _packed_attention(decoder.config):
        hidden = call(decoder, input_ids=tokens, position_ids=positions, prefix_rows=(P, B), use_cache=False,
                      attention_mask=attention_mask_4d(st["g_mask"], decoder, mdt)).last_hidden_state
    if packed_prefix_attention.calls == calls:
        raise ModelError(f"{type(decoder).__name__}: its attention layers do not go through transformers' "
                         "AttentionInterface, which the shared-prefix training step needs; set data.shared_prefix 0")
    return hidden.split([P, B * S], 1)[1].reshape(B, S, -1)


def row_chunks(rows: int, length: int, max_tokens: Optional[int]) -> list[slice]:
    """Row slices that split a micro-batch of `rows` x `length` padded tokens into chunks of at most `max_tokens`
    (a power of two rows each, so that few chunk shapes recur; one row at least). None: the whole batch."""
    if max_tokens is None or rows * length <= max_tokens:
        return [slice(0, rows)]
    per = 1
    while 2 * per < rows and 2 * per * length <= max_tokens:
        per *= 2
    return [slice(s, min(s + per, rows)) for s in range(0, rows, per)]


def compiled_forwards(decoder, skip=()) -> dict[torch.nn.Module, Any]:
    """torch.compile'd forwards for each decoder layer's norms and MLP (but those in `skip`: kernels.py's fused
    ones): the step's largest elementwise work (fp32 casts, mean, rsqrt, scale; SiLU and product over the
    8,960-wide activations) fused into a few kernels.
    One compiled function per class, bound to every instance: the 28 layers share its graphs (4-5 in all).
    The LoRA linears are left alone: compiling them too made ~20 more graphs (+65 s) for no measurable gain
    (14.9 s steady either way, results/gpu/fit_epoch_packed.json vs fit_epoch_compile_norms_mlps.json)."""
    by_class: dict[type, Any] = {}
    out = {}
    for layer in decoder.layers:
        for m in layer.modules():
            norm = "RMSNorm" in type(m).__name__ or isinstance(m, torch.nn.LayerNorm)
            if (norm or m is getattr(layer, "mlp", None)) and m not in skip:
                if type(m) not in by_class:
                    by_class[type(m)] = _per_token(torch.compile(type(m).forward, dynamic=True))
                out[m] = types.MethodType(by_class[type(m)], m)
    return out


def _per_token(compiled):
    """A norm's or MLP's forward called on [tokens, hidden] (they work token by token): every input shape, a
    batch-1 prefix pass's [1, P, H] as well as the rows' [B, T, H], meets one graph. Dynamic shapes still
    specialise a size of 1, so [1, P, H] and [B, T, H] would compile twice."""
    def forward(self, x):
        return compiled(self, x.reshape(-1, x.shape[-1])).view(x.shape)
    return forward


@contextmanager
def fast_modules(model, forwards: dict[torch.nn.Module, Any], uncast_lora_input: bool, skip_cudnn_attention: bool):
    """For a while: the modules' forwards replaced by the given ones (compiled_forwards), and (uncast_lora_input,
    under low-precision autocast) LoRA layers that take their input as it is. peft casts it to the adapter's fp32
    first, then autocast casts (the dropped-out copy) back for the matmul: the same numbers (dropout scales in fp32
    and rounds once either way, forward and backward; in eval it is the identity) at two extra copies and an fp32
    dropout per LoRA layer per pass. skip_cudnn_attention (CUDA): SDPA picks among flash, memory-efficient and
    math kernels, not cuDNN's, which builds an execution plan for every new shape (fwd + bwd: ~0.25 s per captured
    training shape; labeling batches each have their own shape); the memory-efficient kernel serves the same
    masks. Used by the training step and by label scoring."""
    from peft.helpers import disable_input_dtype_casting
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for m, forward in forwards.items():
        m.forward = forward
    try:
        with ExitStack() as stack:
            stack.enter_context(disable_input_dtype_casting(model, active=uncast_lora_input))
            if skip_cudnn_attention:
                stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]))
            yield
    finally:
        for m in forwards:
            del m.forward  # back to the class's own


class GraphedLossBackward:
    """`(loss_sum, n_supervised)` of a static micro-batch, its LoRA gradients added into `p.grad`."""

    def __init__(self, model, compute_dtype: torch.dtype, use_graphs: bool, max_tokens: Optional[int] = None,
                 compile_layers: bool = False, fused_layers: bool = False):
        self.model = model
        self.max_tokens = max_tokens  # model.chunk_tokens: longer micro-batches run as row chunks
        self.decoder, self.head, _ = split_head(model)
        # The attention's LoRA linears with fewer kernels (finllm_pl/fused.py), (model.fused_layers) norms and MLPs
        # in fused kernels that need no compiling (kernels.py) and (model.compile_layers) the other norms and MLPs
        # compiled: forwards put in place only while this step runs (or is captured); labeling makes its own
        # (FinLLM._labeling_modules)
        self.fused_layers = fused_layer_forwards(self.decoder) if fused_layers else {}
        self.compiled = compiled_forwards(self.decoder, skip=self.fused_layers) if compile_layers else {}
        self.forwards = {**fused_forwards(self.decoder), **self.fused_layers, **self.compiled}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dtype = compute_dtype
        # Under autocast every LoRA matmul casts its fp32 weight to bf16 (and its gradient back): 448 small copy
        # kernels per step for the 1.5B model. One cast of all of them at the step's start is the same numbers.
        named = [(n, p) for n, p in self.decoder.named_parameters() if p.requires_grad]
        self.adapter_names = [n for n, _ in named]
        self.cast_adapter_once = (compute_dtype != torch.float32 and len(named) == len(self.params) and
                                  all(".lora_A." in n or ".lora_B." in n for n in self.adapter_names))
        self.use_graphs = use_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.grads: list[torch.Tensor] | None = None  # gradient buffers the optimizer reads (p.grad)

    def _decoder(self):
        """How the step calls the decoder: as it is, or (cast_adapter_once) with every LoRA weight replaced by its
        compute-dtype copy, made by one cast of them all (their gradients flow back through it to the fp32
        weights the optimizer keeps)."""
        if not self.cast_adapter_once:
            return _decoder_call
        low = torch.cat([p.reshape(-1) for p in self.params]).to(self.dtype).split([p.numel() for p in self.params])
        swap = {n: t.view_as(p) for n, t, p in zip(self.adapter_names, low, self.params)}
        return lambda decoder, **kwargs: torch.func.functional_call(decoder, swap, (), kwargs, strict=False)

    def _loss_and_grads(self, st: dict[str, torch.Tensor]):
        dev = st["g_ids"].device.type
        low = self.dtype != torch.float32
        with fast_modules(self.model, self.forwards, uncast_lora_input=low, skip_cudnn_attention=dev == "cuda"), \
                torch.autocast(dev, dtype=self.dtype, enabled=low, cache_enabled=False):
            mdt, call = mask_dtype(self.head), self._decoder()
            if "g_pre" in st:  # the rows' shared prefix once, packed in front of them: one pass
                hidden = packed_prefix_hidden(self.decoder, st, mdt, call)
            else:
                hidden = call(self.decoder, input_ids=st["g_ids"], position_ids=st["g_pos"], use_cache=False,
                              attention_mask=attention_mask_4d(st["g_mask"], self.decoder, mdt)).last_hidden_state
            h = hidden.gather(1, st["g_idx"][..., None].expand(-1, -1, hidden.shape[-1]))
            ce = F.cross_entropy(self.head(h.reshape(-1, h.shape[-1])).float(), st["g_tgt"].reshape(-1),
                                 reduction="none")
            loss = (ce * st["g_w"].reshape(-1)).sum()
        grads = torch.autograd.grad(loss, self.params)
        return loss.detach(), st["g_w"].sum(), grads

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        st = {k: v for k, v in batch.items() if k.startswith("g_")}
        rows, length = st["g_ids"].shape
        loss = n = None
        parts = row_chunks(rows, length, self.max_tokens)
        if len(parts) > 1:
            # The few micro-batches that run as chunks come in many lengths (96, 112, 128, 192, 224 here), each a
            # capture (~0.2 s) that serves a batch or two per epoch: padded to a power of two (at most what keeps
            # the chunks' rows within max_tokens), they share two.
            padded = min(1 << (length - 1).bit_length(), self.max_tokens // (parts[0].stop - parts[0].start))
            st = pad_static_length(st, padded)
        for part in parts:
            # A chunk holds some of the rows (views; the shared prefix is every chunk's): its own graph shape.
            chunk = st if len(parts) == 1 else {k: v if k == "g_pre" else v[part] for k, v in st.items()}
            l, c, grads = self._replay(chunk)
            self._accumulate(grads)
            # cloned/added before the next replay overwrites the graph's outputs
            loss, n = (l.clone(), c.clone()) if loss is None else (loss + l, n + c)
        return loss, n

    def _replay(self, st: dict[str, torch.Tensor]):
        if not self.use_graphs:
            return self._loss_and_grads(st)
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
            # An earlier shape has already run eagerly: compiled and tuned the kernels, made the library handles.
            # This one is captured at once and replayed for its result, without an eager warm-up step of its own
            # (~0.3-0.6 s each, most of a capture: results/gpu/fit_epoch_captures.json). Should its compiled norms or
            # MLPs need compiling again (a guard this shape fails), dynamo raises before the pass records anything
            # and the shape takes the warm-up route below.
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = self._record(key, static)
            except RuntimeError as e:
                if "fail_on_recompile" not in str(e):
                    raise
            else:
                self.graphs[key][0].replay()
                return out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # this batch's real step, eagerly (also the warm-up before capturing)
            eager = self._loss_and_grads(static)
        torch.cuda.current_stream().wait_stream(side)
        self._record(key, static)
        return eager

    def _record(self, key, static):
        """Captures the step on `static`'s buffers into a graph of the shared pool; its outputs (not yet computed)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps allocating pinned buffers (cudaHostAlloc,
        # cudaEventQuery) while this thread captures; under the default "global" mode any such call from any
        # thread invalidates the capture (and the thread's error kills the run). Its calls never touch the
        # captured stream; this thread's own unsafe calls still raise.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._loss_and_grads(static)
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
