"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` submodules, so PriSM can factorize them.

PyTorch's ``nn.MultiheadAttention`` keeps the input projection in a bare ``in_proj_weight`` tensor and
applies ``out_proj`` functionally, so neither can be replaced by a principal layer. :func:`convert_attention`
swaps every ``nn.MultiheadAttention`` of a model for :class:`PrismMultiheadAttention`, whose projections are
``nn.Linear`` modules (``in_proj``: E → 3E packed as in PyTorch, or ``q_proj`` / ``k_proj`` / ``v_proj`` when
``kdim`` / ``vdim`` differ from E; ``out_proj``: E → E) and whose forward reproduces PyTorch's: batched and
unbatched inputs, ``batch_first``, ``key_padding_mask`` and ``attn_mask`` (bool or float, 2-D or 3-D),
``need_weights`` / ``average_attn_weights``, ``is_causal``, ``add_bias_kv``, ``add_zero_attn`` and attention
dropout. The law: a converted module returns what the original returns (``tests/engine/test_factorize_rule.py``).
:func:`restore_attention` is the inverse (dense projections only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import set_submodule


class PrismMultiheadAttention(nn.Module):
    """Multi-head attention whose input and output projections are ``nn.Linear`` submodules.

    Build it with :meth:`from_torch`; the signature of :meth:`forward` and its return value are those of
    ``nn.MultiheadAttention.forward``. State: ``in_proj.weight`` / ``in_proj.bias`` are PyTorch's
    ``in_proj_weight`` / ``in_proj_bias`` (or ``q_proj`` / ``k_proj`` / ``v_proj``, each with its third of the
    bias), ``out_proj`` as in PyTorch, ``bias_k`` / ``bias_v`` when ``add_bias_kv``.
    """

    #: PyTorch's ``TransformerEncoderLayer`` has a fused inference path that reads ``in_proj_weight``
    #: directly; it is taken only when this is True, so False routes every call through :meth:`forward`.
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim}, num_heads={num_heads} is invalid: allowed positive values with embed_dim "
                "divisible by num_heads"
            )
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.in_proj: nn.Linear | None = None
        self.q_proj = self.k_proj = self.v_proj = None
        if self.kdim == embed_dim and self.vdim == embed_dim:
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **kw)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
            self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
            self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **kw)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **kw)) if add_bias_kv else None

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The packed input bias (read by PyTorch's transformer layers to pick their fast path)."""
        return self.in_proj.bias if self.in_proj is not None else None

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> PrismMultiheadAttention:
        """An equivalent module holding copies of ``mha``'s parameters (same device, dtype, train mode)."""
        weight = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        out = cls(
            mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            if out.in_proj is not None:
                out.in_proj.weight.copy_(mha.in_proj_weight)
                if mha.in_proj_bias is not None:
                    out.in_proj.bias.copy_(mha.in_proj_bias)
            else:
                biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
                for proj, w, b in zip((out.q_proj, out.k_proj, out.v_proj), weights, biases, strict=True):
                    proj.weight.copy_(w)
                    if b is not None:
                        proj.bias.copy_(b)
            _copy_shared(out, mha)
        return out.train(mha.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (the projections must be dense ``nn.Linear``)."""
        projections = [p for p in (self.in_proj, self.q_proj, self.k_proj, self.v_proj, self.out_proj) if p is not None]
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise TypeError("cannot restore nn.MultiheadAttention from factorized projections: rebuild the dense model")
        w = self.out_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, bias=self.out_proj.bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            if self.in_proj is not None:
                mha.in_proj_weight.copy_(self.in_proj.weight)
                if self.in_proj.bias is not None:
                    mha.in_proj_bias.copy_(self.in_proj.bias)
            else:
                mha.q_proj_weight.copy_(self.q_proj.weight)
                mha.k_proj_weight.copy_(self.k_proj.weight)
                mha.v_proj_weight.copy_(self.v_proj.weight)
                if self.q_proj.bias is not None:
                    mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
            _copy_shared(mha, self)
        return mha.train(self.training)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (batch-first). With the packed ``in_proj``, self-attention (``query is key is value``)
        costs one product; otherwise the packed projection runs once per distinct input and keeps its
        slice (correct, at up to 3× that projection's MACs for cross-attention)."""
        if self.in_proj is None:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        q = self.in_proj(query)[..., :e]
        if key is value:
            k, v = self.in_proj(key)[..., e:].chunk(2, dim=-1)
            return q, k, v
        return q, self.in_proj(key)[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``: returns ``(output, weights or None)``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = _each(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _each(lambda t: t.transpose(0, 1), query, key, value)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (as in nn.MultiheadAttention): pass the causal mask")
        dtype = query.dtype
        padding = _float_mask(key_padding_mask, "key_padding_mask", dtype)
        # PyTorch uses the is_causal hint only when nothing else is masked and no weights are returned
        causal = is_causal and padding is None and not need_weights
        mask = None if causal else _float_mask(attn_mask, "attn_mask", dtype)

        q, k, v = self._project(query, key, value)
        n, tgt, e = q.shape
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            mask, padding = _pad_last(mask), _pad_last(padding)
        q, k, v = (t.view(n, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(n, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            mask, padding = _pad_last(mask), _pad_last(padding)
        src = k.shape[2]
        mask = self._merge(mask, padding, n, tgt, src)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, e))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _merge(self, mask: Tensor | None, padding: Tensor | None, n: int, tgt: int, src: int) -> Tensor | None:
        """``attn_mask`` (2-D ``(L, S)`` or 3-D ``(N·heads, L, S)``) plus ``key_padding_mask`` (``(N, S)``)
        as one additive mask broadcastable to ``(N, heads, L, S)``."""
        if mask is not None:
            if mask.dim() == 2 and mask.shape == (tgt, src):
                mask = mask.view(1, 1, tgt, src)
            elif mask.dim() == 3 and mask.shape == (n * self.num_heads, tgt, src):
                mask = mask.view(n, self.num_heads, tgt, src)
            else:
                raise RuntimeError(
                    f"attn_mask of shape {tuple(mask.shape)} is invalid: allowed ({tgt}, {src}) or "
                    f"({n * self.num_heads}, {tgt}, {src})"
                )
        if padding is not None:
            if padding.shape != (n, src):
                raise RuntimeError(f"key_padding_mask of shape {tuple(padding.shape)} is invalid: allowed ({n}, {src})")
            padding = padding.view(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _copy_shared(dst: nn.Module, src: nn.Module) -> None:
    """Copy what both attention forms hold under the same names: ``out_proj`` and ``bias_k`` / ``bias_v``."""
    dst.out_proj.weight.copy_(src.out_proj.weight)
    if src.out_proj.bias is not None:
        dst.out_proj.bias.copy_(src.out_proj.bias)
    if src.bias_k is not None:
        dst.bias_k.copy_(src.bias_k)
        dst.bias_v.copy_(src.bias_v)


def _each(fn: Callable[[Tensor], Tensor], query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``fn`` applied once per distinct input, so ``query is key`` (self-attention) stays true."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else (q if value is query else fn(value))
    return q, k, v


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed to attend) as an additive float mask; a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} of dtype {mask.dtype} is invalid: allowed a bool or floating-point mask")
    return mask.to(dtype)


def _pad_last(mask: Tensor | None) -> Tensor | None:
    """One more (attendable) key position at the end of a mask's last dimension."""
    return None if mask is None else F.pad(mask, (0, 1))


def convert_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by an equivalent
    :class:`PrismMultiheadAttention`, in place; returns ``model`` (or the converted module when ``model``
    itself is one). A ``nn.TransformerEncoder`` holding converted layers stops using nested tensors (its
    nested fast path reads ``in_proj_weight`` directly); the outputs are the same."""
    if isinstance(model, nn.MultiheadAttention):
        return PrismMultiheadAttention.from_torch(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            set_submodule(model, name, PrismMultiheadAttention.from_torch(module))
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, PrismMultiheadAttention) for m in module.modules()
        ):
            module.use_nested_tensor = False
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_attention` (e.g. on ``PrincipalModel.dense_model()``), in place:
    every :class:`PrismMultiheadAttention` becomes an ``nn.MultiheadAttention`` again, so the state dict
    has PyTorch's keys. Returns ``model``."""
    if isinstance(model, PrismMultiheadAttention):
        return model.to_torch()
    for name, module in list(model.named_modules()):
        if isinstance(module, PrismMultiheadAttention):
            set_submodule(model, name, module.to_torch())
    return model
