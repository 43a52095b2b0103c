"""The attention's LoRA linears with fewer, larger kernels (fast component `lora_groups`; plain torch + peft).

Why: peft runs a LoRA linear as base matmul, dropout, A matmul, B matmul, scale, add: six kernels that each read or
write a whole [tokens, hidden] tensor for a rank-4 update, and its backward twice that. With the base held
dequantized and the step replayed from a CUDA graph, the 1.5B model's attention projections took 11.4 ms of a
~34 ms training step, where their matmuls' arithmetic needs ~2.
- q_proj, k_proj and v_proj read the same hidden states. One matmul over their weights concatenated computes all
  three base outputs. Their LoRA updates take two more: one batched matmul for the three A's (three independent
  dropout masks, drawn by one kernel) and one for the three B's as one block-diagonal matrix, which scales and
  adds into the base output. The k and v outputs are handed to k_proj and v_proj when the attention layer calls them
  with the same input right after q_proj.
- Every other LoRA linear of the attention (o_proj): B's matmul scales and adds into the base output.
Same math as peft's forward; only float rounding differs, and the dropout masks come from the same RNG in another
order. Only the plain case takes this route: frozen nn.Linear bases (dequantized or unquantized), one active vanilla
LoRA adapter (or merged ones: the base alone), inputs in the adapter's dtype or under autocast; anything else runs
peft's own forward, checked at every call. The concatenated weights are kept until `invalidate()` (the backend calls
it whenever weights change: an optimizer step, a load, a merge). MLP linears are left alone (gate/up as one matmul
did not pay for a 1.5 GB weight copy: docs/performance.md).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

QKV = ("q_proj", "k_proj", "v_proj")  # the HF name of the projections an attention layer calls one after another


def _base(m: torch.nn.Module) -> torch.nn.Module:
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _adapter(m: torch.nn.Module) -> Any:
    """How `m` computes now: "base" (its base linear alone: no LoRA layer, or the adapter merged in), the name of
    its one active vanilla LoRA adapter, or None (peft's own forward must run: several adapters, DoRA or another
    variant, a LoRA bias, adapters disabled)."""
    if not hasattr(m, "lora_A"):
        return "base"
    if m.disable_adapters:
        return None
    if m.merged:
        return "base"
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1:
        return "base" if not active else None
    a = active[0]
    if a in getattr(m, "lora_variant", {}) or m.use_dora.get(a) or m.lora_bias.get(a):
        return None
    return a


def _dropout_p(m: torch.nn.Module, a: str) -> Optional[float]:
    d = m.lora_dropout[a]
    if isinstance(d, torch.nn.Identity):
        return 0.0
    if type(d) is torch.nn.Dropout:
        return d.p if d.training else 0.0
    return None  # some other module: peft's forward


def lora_hidden(x2: torch.Tensor, As: list[torch.Tensor], p: float) -> torch.Tensor:
    """[tokens, n * r]: each A applied to its own dropout of x2 [tokens, hidden] (dropout probability p)."""
    n = len(As)
    if p == 0:
        return F.linear(x2, torch.cat(As) if n > 1 else As[0])
    dropped = F.dropout(x2.expand(n, *x2.shape), p, training=True)  # n independent masks, one kernel
    return torch.bmm(dropped, torch.stack(As).transpose(1, 2)).transpose(0, 1).reshape(x2.shape[0], -1)


class LoRAGroup:
    """Linears of one attention layer that read the same input, computed by the first one's call: its output is
    returned, the others' are kept for their calls (with the very same input tensor) that follow."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.bases = [_base(m) for m in modules]
        self.sizes = [b.out_features for b in self.bases]
        self._fused: Optional[tuple] = None  # (concatenated base weight, bias), until invalidate()
        self._lora: Optional[tuple] = None  # (dtype, A's concatenated, B's block-diagonal), until invalidate()
        self._pending: Optional[tuple] = None  # (input, outputs of the later modules)

    @staticmethod
    def fits(modules: list[torch.nn.Module]) -> bool:
        bases = [_base(m) for m in modules]
        return (all(type(b) is torch.nn.Linear and not b.weight.requires_grad for b in bases)
                and len({b.in_features for b in bases}) == 1
                and len({hasattr(m, "lora_A") for m in modules}) == 1
                and len({b.bias is None for b in bases}) == 1)

    def forwards(self) -> dict[torch.nn.Module, Callable]:
        """The modules' forwards (graphs.fast_modules puts them in place)."""
        out = {self.modules[0]: self._first}
        for i, m in enumerate(self.modules[1:], 1):
            out[m] = lambda x, *args, _i=i, **kwargs: self._later(_i, x, *args, **kwargs)
        return out

    def invalidate(self) -> None:
        """Forget the concatenated weights: a base weight, an adapter or the merge state changed."""
        self._fused, self._lora = None, None

    def _weights(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base weights (and biases) concatenated, made once until `invalidate()`."""
        if len(self.bases) == 1:
            return self.bases[0].weight, self.bases[0].bias
        if self._fused is None:
            bias = None if self.bases[0].bias is None else torch.cat([b.bias for b in self.bases]).detach()
            self._fused = (torch.cat([b.weight for b in self.bases]).detach(), bias)
        return self._fused

    def _lora_weights(self, As: list[torch.Tensor], Bs: list[torch.Tensor],
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A's concatenated and B's as one block-diagonal matrix, in the matmuls' dtype, kept until `invalidate()`:
        made at every call, they are ~6 small kernels per attention layer per labeling batch. Without gradients
        only (the kept tensors are made without autograd); the same bits as autocast's cast at every call."""
        if self._lora is None or self._lora[0] != dtype:
            A = torch.cat(As) if len(As) > 1 else As[0]
            B = torch.block_diag(*Bs) if len(Bs) > 1 else Bs[0]
            self._lora = (dtype, A.to(dtype), B.to(dtype))
        return self._lora[1], self._lora[2]

    def _first(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._pending = None
        adapters = [_adapter(m) for m in self.modules]
        lora = "base" not in adapters
        if None not in adapters and lora:
            ps = [_dropout_p(m, a) for m, a in zip(self.modules, adapters)]
            As = [m.lora_A[a].weight for m, a in zip(self.modules, adapters)]
            plain = (None not in ps and len(set(ps)) == 1 and len({A.shape[0] for A in As}) == 1
                     and (x.dtype == As[0].dtype or torch.is_autocast_enabled(x.device.type)))
        else:  # the base alone (every module), or peft's forward
            plain = set(adapters) == {"base"}
        if args or kwargs or not plain:
            return type(self.modules[0]).forward(self.modules[0], x, *args, **kwargs)
        x2 = x.reshape(-1, x.shape[-1])
        weight, bias = self._weights()
        y = F.linear(x2, weight, bias)
        if lora:
            Bs = [m.lora_B[a].weight for m, a in zip(self.modules, adapters)]
            scales = [m.scaling[a] for m, a in zip(self.modules, adapters)]
            alpha = scales[0]  # one scale (the usual): the matmul applies it
            if len(set(scales)) > 1:
                Bs, alpha = [B * s for B, s in zip(Bs, scales)], 1.0
            if ps[0] == 0 and not torch.is_grad_enabled():  # labeling: the same A's and B's batch after batch
                A, B = self._lora_weights(As, Bs, y.dtype)  # (y: in the dtype autocast runs the matmuls in)
                # Into y itself: addmm would first copy y into a new output, a device copy of the whole [tokens, out]
                # tensor per call; this is the same matmul and epilogue (beta 1), the same bits (an H100 at 15,000
                # tokens: 0.128 -> 0.084 ms per q/k/v call, docs/performance.md).
                y.addmm_(F.linear(x2, A), B.t(), alpha=alpha)
            else:
                h = lora_hidden(x2, As, ps[0])
                y = torch.addmm(y, h, (torch.block_diag(*Bs) if len(Bs) > 1 else Bs[0]).t(), alpha=alpha)
        outs = [o.unflatten(0, x.shape[:-1]) for o in (y.split(self.sizes, -1) if len(self.sizes) > 1 else [y])]
        if len(outs) > 1:
            self._pending = (x, outs[1:])
        return outs[0]

    def _later(self, i: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pending = self._pending
        if pending is not None and pending[0] is x and not args and not kwargs:
            if i == len(self.modules) - 1:
                self._pending = None  # (drop the references)
            return pending[1][i - 1]
        return type(self.modules[i]).forward(self.modules[i], x, *args, **kwargs)


def lora_groups(decoder: torch.nn.Module) -> list[LoRAGroup]:
    """The attention layers' LoRA linears as groups: q/k/v together (when all three are LoRA layers, or none is),
    every other LoRA linear of the attention on its own. Modules of other shapes are in none (they keep their own
    forward). The backend makes them once per model, so training and labeling share one concatenated q/k/v weight."""
    groups: list[LoRAGroup] = []
    for attn in decoder.modules():
        if not all(isinstance(getattr(attn, n, None), torch.nn.Module) for n in QKV):
            continue
        qkv = [getattr(attn, n) for n in QKV]
        together = LoRAGroup.fits(qkv)
        groups += [LoRAGroup(qkv)] if together else []
        groups += [LoRAGroup([m]) for name, m in attn.named_children()
                   if not (together and name in QKV) and hasattr(m, "lora_A") and LoRAGroup.fits([m])]
    return groups


def group_forwards(groups: list[LoRAGroup]) -> dict[torch.nn.Module, Callable]:
    """The forwards of every group's modules (fast.module_forwards puts them in place)."""
    out: dict[torch.nn.Module, Callable] = {}
    for group in groups:
        out.update(group.forwards())
    return out
