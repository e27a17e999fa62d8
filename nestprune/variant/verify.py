"""The ``--verify`` check: a variant computes what the base model computes with its removed structures zeroed.

Both run in fp32 on a few fixed token sequences; the largest absolute logit difference must be ≤ 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nestprune.errors import NestpruneError
from nestprune.rank.mask import LayerMasks, apply_masks_
from nestprune.variant.widths import VariantSpec

TOLERANCE = 1e-5
NUM_PROMPTS, PROMPT_LEN, PROMPT_SEED = 3, 24, 1234


def spec_masks(spec: VariantSpec) -> LayerMasks:
    """Keep-masks (attention units, channels) of every layer: what the variant kept."""
    arch = spec.arch
    masks: LayerMasks = {}
    for layer in range(arch.num_layers):
        attn = np.zeros(spec.structures.attention_units, bool)
        attn[spec.units(layer)] = True
        mlp = np.zeros(arch.intermediate_size, bool)
        mlp[spec.layers[layer].channels] = True
        masks[layer] = (attn, mlp)
    return masks


def fixed_prompts(vocab_size: int) -> torch.Tensor:
    """(NUM_PROMPTS, PROMPT_LEN) token ids, the same on every machine."""
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, vocab_size, (NUM_PROMPTS, PROMPT_LEN), generator=g)


def masked_base(base_dir: Path, spec: VariantSpec, attn_implementation: str = "eager") -> torch.nn.Module:
    """The base model in fp32 with every structure the variant dropped zeroed (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                 attn_implementation=attn_implementation).eval()
    apply_masks_(model, spec.structures, spec_masks(spec))
    return model


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def verify_variant(base_dir: Path, variant_dir: Path, spec: VariantSpec, tolerance: float = TOLERANCE) -> float:
    """Max |logits(variant) − logits(masked base)| on the fixed prompts; raises if above ``tolerance``."""
    from nestprune.variant.load import load_variant

    ids = fixed_prompts(spec.arch.vocab_size)
    diff = max_logit_diff(load_variant(variant_dir, dtype=torch.float32, attn_implementation="eager"),
                          masked_base(base_dir, spec), ids)
    if not diff <= tolerance:
        raise NestpruneError(f"verification failed: the variant's logits differ from the masked base model's by "
                             f"{diff:.3g} (> {tolerance:g}); the variant was written to {variant_dir}")
    return diff
