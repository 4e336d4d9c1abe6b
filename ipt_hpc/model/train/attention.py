"""Core attention on PyTorch's ``scaled_dot_product_attention`` for Megatron-Core's local layer spec.

Megatron-Core 0.16's local spec computes ``DotProductAttention`` unfused: the full ``[b, np, s, s]`` score
matrix in fp32, K/V repeated for GQA. Without Transformer Engine that ran our training at 0.32x of Hugging
Face with SDPA on an H200 (docs/benchmarks.md). :class:`SDPAttention` is a drop-in subclass that hands the
same tensors to ``F.scaled_dot_product_attention`` (flash, cuDNN or memory-efficient kernels on GPU, the flash
kernel on CPU). It has no parameters of its own (a vanilla softmax has none), so state dicts, checkpoints and
the Hugging Face mapping are unchanged, and the two implementations can be swapped on resume.

Where SDPA cannot compute exactly what the parent computes (an explicit mask, attention bias, packed
sequences, sliding windows, a learnable or off-by-one softmax, query/key shapes of inference with a KV cache,
attention dropout), the parent's unfused path runs, with one log line per reason and process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# torch.nn.attention.SDPBackend's values, as aten::_fused_sdp_choice returns them
KERNELS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


@dataclass(frozen=True)
class Choice:
    """How SDPA runs for one input signature: the kernel, and whether GQA is native or K/V are repeated."""

    kernel: str
    gqa: str  # "native" (enable_gqa), "repeat" (K/V repeated first), "none" (as many KV heads as query heads)

    def describe(self) -> str:
        return self.kernel if self.gqa == "none" else f"{self.kernel} ({self.gqa} GQA)"


def sdpa_choice(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, is_causal: bool = True) -> Choice:
    """The kernel PyTorch's dispatcher picks for ``[b, np, s, hn]`` query and ``[b, ng, s, hn]`` key/value.

    GQA natively (``enable_gqa``) where a fused kernel takes it (bf16/fp16 flash on GPU, any dtype on CPU);
    otherwise K/V repeated to the query heads, where that reaches a fused kernel (fp32 on GPU takes the
    memory-efficient kernel that way instead of the math one). ``aten::_fused_sdp_choice`` is the dispatcher's
    own decision, so the answer honours the global ``torch.backends.cuda.*_sdp`` switches.
    """
    if query.size(1) == key.size(1):
        return Choice(_kernel(query, key, value, is_causal, False), "none")
    native = _kernel(query, key, value, is_causal, True)
    if native not in ("math", "error"):
        return Choice(native, "native")
    groups = query.size(1) // key.size(1)
    rep_k, rep_v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    repeated = _kernel(query, rep_k, rep_v, is_causal, False)
    if repeated not in ("math", "error") or native == "error":
        return Choice(repeated, "repeat")
    return Choice("math", "native")


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, gqa: bool) -> str:
    code = torch.ops.aten._fused_sdp_choice(q, k, v, None, 0.0, is_causal, scale=None, enable_gqa=gqa)
    return KERNELS.get(int(code), f"backend {code}")


def probe_choice(
    *, heads: int, groups: int, head_dim: int, seq: int, batch: int, dtype: torch.dtype, device: str | torch.device
) -> Choice:
    """:func:`sdpa_choice` for a model's per-partition shapes, on empty tensors (for logs and reports)."""
    q = torch.empty(batch, heads, seq, head_dim, dtype=dtype, device=device)
    kv = torch.empty(batch, groups, seq, head_dim, dtype=dtype, device=device)
    return sdpa_choice(q, kv, kv)


def _sdpa_attention_class():
    """:class:`SDPAttention`, defined on first use so importing this module does not import Megatron-Core."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPAttention(DotProductAttention):
        """``DotProductAttention`` computed by ``F.scaled_dot_product_attention`` (see the module docstring)."""

        _logged: set[str] = set()  # noqa: RUF012 - one log line per fallback reason and process

        def __init__(self, config, layer_number: int, attn_mask_type, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
            self._static_reason = self._unsupported_config()
            self._choices: dict[tuple, Choice] = {}

        def _unsupported_config(self) -> str | None:
            cfg = self.config
            if self.scale_mask_softmax.window_size is not None:
                return "sliding-window attention"
            if cfg.softmax_type != "vanilla":
                return f"softmax_type={cfg.softmax_type}"
            if cfg.apply_query_key_layer_scaling:
                return "apply_query_key_layer_scaling"
            if not isinstance(self.attention_dropout, torch.nn.Dropout):
                return "a custom attention dropout"
            return None

        def _fallback_reason(self, query, key, attention_mask, mask_type, attention_bias, packed_seq_params):
            if self._static_reason:
                return self._static_reason
            if attention_mask is not None:
                return "an explicit attention mask"
            if attention_bias is not None:
                return "attention bias"
            if packed_seq_params is not None:
                return "packed sequences"
            if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                return f"attn_mask_type={mask_type.name}"
            if mask_type == AttnMaskType.causal and query.size(0) != key.size(0):
                return "causal attention with query length != key length (KV cache)"
            if self.training and self.attention_dropout.p > 0:
                return "attention dropout (its RNG stream is Megatron's tracker, not SDPA's)"
            return None

        def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            attn_mask_type=None,
            attention_bias: torch.Tensor | None = None,
            packed_seq_params=None,
        ) -> torch.Tensor:
            mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
            reason = self._fallback_reason(query, key, attention_mask, mask_type, attention_bias, packed_seq_params)
            if reason is not None:
                if reason not in SDPAttention._logged:
                    SDPAttention._logged.add(reason)
                    log.warning("train.attention=sdpa: the unfused attention runs instead, for %s", reason)
                return super().forward(
                    query,
                    key,
                    value,
                    attention_mask,
                    attn_mask_type=attn_mask_type,
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                )
            # [s, b, heads, hn] -> [b, heads, s, hn]: strided views, no copies
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            choice = self.choice(q, k, v, causal=mask_type == AttnMaskType.causal)
            if choice.gqa == "repeat":
                groups = q.size(1) // k.size(1)
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=mask_type == AttnMaskType.causal,
                scale=self.softmax_scale,
                enable_gqa=choice.gqa == "native",
            )
            # [b, np, s, hn] -> [s, b, np * hn]
            s, b = context.size(2), context.size(0)
            return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

        def choice(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True) -> Choice:
            sig = (q.shape, k.shape, q.dtype, q.device, causal)
            if sig not in self._choices:
                self._choices[sig] = sdpa_choice(q, k, v, is_causal=causal)
            return self._choices[sig]

    return SDPAttention


_CLASS: type | None = None


def sdpa_attention_class() -> type:
    """The ``SDPAttention`` class (a ``DotProductAttention`` subclass), created once per process."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _sdpa_attention_class()
    return _CLASS
