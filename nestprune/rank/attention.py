"""The attention a build runs: the model's own kernel behind one wrapper that gathers K/V per query head.

Why a wrapper: GISP's reference GQA mode removes *query* heads and never K/V heads, so once a layer is
compacted (``compact.py``) its query heads no longer come in equal groups per KV head and transformers'
``repeat_kv`` / SDPA ``enable_gqa`` cannot pair them. Every attention module of such a layer carries
``nestprune_kv_index`` (the KV head of each of its query heads, a LongTensor) and
``num_key_value_groups = 1``; the wrapper gathers ``key``/``value`` at those heads and calls the base
kernel as for multi-head attention. Modules without the attribute pass straight through.

The build installs the gather in GQA query-head mode from the first step, compacted or not
(:func:`prepare_attention`), so that the zeroing path (``--no-compact``) and the compacted path run the
same kernels in the same arrangement (see ``compact.py`` on exactness). The memory planner runs the same
wrapper around its model of the fused kernel (:func:`fused_attention`), so a plan counts the gathered
K/V too.

Base kernels: ``sdpa`` and ``eager`` (the modelling file's own ``eager_attention_forward``, which applies
Gemma-2's attention soft-capping), or :data:`FUSED_ATTENTION` (the planner's). The wrapper is registered
under ``nestprune_gather_<base>`` with the base's mask function, so masks are made as for the base.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

KV_INDEX = "nestprune_kv_index"
PREFIX = "nestprune_gather_"
FUSED_ATTENTION = "nestprune_fused"
_REGISTERED: set[str] = set()


def fused_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention through a fused kernel. q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D).

    On meta: the CUDA flash kernel's op (output + fp32 logsumexp saved for backward; GQA without
    repeating k/v, as flash does). Elsewhere: SDPA, which picks the device's fused kernel. Memory
    model only: padding masks are ignored (the build's LM windows have none).
    """
    if query.device.type == "meta":
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False,
                                                                 scale=scaling)[0]
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _base_function(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # each modelling file has its own (Gemma-2's soft-caps the attention logits)
        return sys.modules[type(module).__module__].eager_attention_forward
    if base == FUSED_ATTENTION:
        return fused_attention
    return ALL_ATTENTION_FUNCTIONS[base]


def gather_kv(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V (B, Hkv, T, D) -> (B, H, T, D) at the module's ``nestprune_kv_index``; unchanged without one."""
    index = getattr(module, KV_INDEX, None)
    if index is None:
        return key, value
    return key.index_select(1, index), value.index_select(1, index)


def register(base: str) -> str:
    """Register the gathering wrapper of ``base`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    if name in _REGISTERED:
        return name

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        key, value = gather_kv(module, key, value)
        return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
    if mask is not None:  # no mask function (the fused model): transformers makes no mask, as for flash
        AttentionMaskInterface.register(name, mask)
    _REGISTERED.add(name)
    return name


def base_of(name: str | None) -> str:
    name = name or "eager"
    return name.removeprefix(PREFIX)


def set_kv_index(attn: torch.nn.Module, kv_of_head: torch.Tensor | None, groups: int) -> None:
    """Give one attention module its K/V gather (``None``: none) and the group count the kernel sees."""
    if kv_of_head is None:
        if hasattr(attn, KV_INDEX):
            delattr(attn, KV_INDEX)
    else:
        setattr(attn, KV_INDEX, kv_of_head)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = groups


def prepare_attention(model: torch.nn.Module, gather: bool) -> Callable[[], None]:
    """Route ``model``'s attention through the wrapper; with ``gather`` (GQA query-head mode) every layer
    gathers K/V per query head from the start. Returns a function that undoes it all."""
    from nestprune.arch import arch_from_config

    config = model.config
    before = config._attn_implementation
    config._attn_implementation = register(base_of(before))
    arch = arch_from_config(config.to_dict())
    fam = arch.fam
    layers = model.get_submodule(fam.layers_path)
    saved = []
    if gather and arch.is_gqa:
        for layer in layers:
            attn = layer.get_submodule(fam.attention)
            saved.append((attn, getattr(attn, "num_key_value_groups", None)))
            device = next(attn.parameters()).device
            kv = torch.arange(arch.num_heads, device=device) // arch.group_size
            set_kv_index(attn, kv, 1)

    def undo() -> None:
        config._attn_implementation = before
        for attn, groups in saved:
            set_kv_index(attn, None, groups if groups is not None else 1)

    return undo
