"""The ``--verify`` check: a variant computes what the base model computes with its removed structures zeroed.

Both models run in **fp64** on a few fixed token sequences, and the largest absolute logit difference must
be at most ``TOLERANCE`` times the logit scale (the largest absolute logit of the masked base, at least 1).

Why this tolerance is right by construction: the variant and the masked base compute the same function —
every term the variant drops is an exact zero in the masked base — so their logits can differ only by
rounding, from summing the same terms in another order. In fp64 (unit roundoff 1.1e-16) that is ~1e-15 of
the logit scale. transformers runs a few steps in fp32 whatever the model's dtype (RMSNorm statistics, the
attention softmax, rotary tables); a 1e-16 difference entering one of them flips an fp32 rounding only
rarely, and each flip moves a value by one fp32 ulp (6e-8 relative): ``TOLERANCE`` = 1e-6 leaves room for
many such flips. A slicing error — one head or channel taken from the wrong place, one wrong row — moves
logits by 1e-4 of their scale or (much) more, two orders above it (tests/test_verify.py measures both). A
fixed absolute tolerance in fp32 has neither property: fp32 rounding alone is ~1e-7 of the logit scale, so
1e-5 fails exact variants of models whose logits reach ~100, and is loose for models with small logits.
Cost: both models are held in fp64 (8 bytes per parameter each) while the check runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nestprune.errors import Fault
from nestprune.rank.mask import LayerMasks, apply_masks_
from nestprune.variant.widths import VariantSpec

TOLERANCE = 1e-6  # relative to the logit scale; see the module docstring
DTYPE = torch.float64
NUM_PROMPTS, PROMPT_LEN, PROMPT_SEED = 3, 24, 1234


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float  # largest |logits(variant) - logits(masked base)| over the fixed prompts
    scale: float  # max(1, largest |logit| of the masked base)
    tolerance: float  # relative: the check is max_abs_diff <= tolerance * scale

    @property
    def bound(self) -> float:
        return self.tolerance * self.scale

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound  # False for NaN


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


def masked_base(base_dir: Path, spec: VariantSpec, attn_implementation: str = "eager",
                dtype: torch.dtype = DTYPE) -> torch.nn.Module:
    """The base model with every structure the variant dropped zeroed (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation=attn_implementation,
                                                 use_safetensors=True).eval()
    apply_masks_(model, spec.structures, spec_masks(spec))
    return model


@torch.no_grad()
def compare_logits(variant: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor,
                   tolerance: float = TOLERANCE) -> Verification:
    ref = reference(input_ids=ids).logits
    got = variant(input_ids=ids).logits
    if got.shape != ref.shape:
        raise Fault(f"verification failed: the variant's logits have shape {tuple(got.shape)}, the masked base "
                    f"model's {tuple(ref.shape)}")
    scale = max(1.0, float(ref.abs().max()))
    return Verification(max_abs_diff=float((got - ref).abs().max()), scale=scale, tolerance=tolerance)


def verify_variant(base_dir: Path, variant_dir: Path, spec: VariantSpec, tolerance: float = TOLERANCE) -> Verification:
    """Compare the variant's fp64 logits with the masked base's on the fixed prompts; raises if they differ by
    more than ``tolerance`` × the logit scale."""
    from nestprune.variant.load import load_variant

    ids = fixed_prompts(spec.arch.vocab_size)
    result = compare_logits(load_variant(variant_dir, dtype=DTYPE, attn_implementation="eager"),
                            masked_base(base_dir, spec, dtype=DTYPE), ids, tolerance)
    if not result.passed:
        raise Fault(f"verification failed: the variant's fp64 logits differ from the masked base model's by "
                    f"{result.max_abs_diff:.3g} (more than {tolerance:g} x the logit scale {result.scale:.3g}); "
                    f"the variant was written to {variant_dir}; do not use it")
    return result
