"""GISP's first-order, loss-based structure scores (pure tensor math, no I/O, no devices).

Per weight: S_w = | W ⊙ mean_n ∇_W ℓ_n |  (abs after averaging). A structure's raw score is the sum
of S_w over the weights it owns (arch.py's table, segment by segment inside fused tensors; biases are
not scored, as in the reference).
Block-wise normalisation divides by a constant per block type (arch.ArchInfo.normaliser).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from nestprune.arch import Structures, TensorSlice


def per_unit(s: TensorSlice, metric: torch.Tensor, units: int, width: int) -> torch.Tensor:
    """Sum an (out, in) per-weight metric into one value per unit of the slice's index space. (units,)

    Each unit's values are summed as one contiguous block (columns through a transposed copy), so a unit's
    sum does not depend on how many other units the tensor holds: a compacted layer scores its units
    bit-identically to the full-width one (a column sum over a wider tensor takes other vector lanes)."""
    if s.axis == 1:
        metric = metric.t().contiguous()  # (in, out) -> (out, in): the unit's columns become rows
    return metric.reshape(units, width, -1).sum(dim=(1, 2))


def fold_attention(st: Structures, s: TensorSlice, per: torch.Tensor) -> torch.Tensor:
    """Per-unit values of a q/kv slice -> per attention structure (query heads fold into their KV group)."""
    if s.space == "q" and st.attention_kind == "group":
        return per.reshape(-1, st.arch.group_size).sum(1)  # (groups, heads/group) -> (groups,)
    return per  # q under head kind; kv under MHA (head h = kv head h) or group kind (group g = kv head g)


def scored_tensors(st: Structures) -> list[tuple[str, list[TensorSlice]]]:
    """The scored tensors of a layer, each with its scored segments, in the order scores are summed."""
    scored = st.scored_slices()
    return [(name, [s for s in scored if s.name == name]) for name in dict.fromkeys(s.name for s in scored)]


def segment_values(st: Structures, metric: Callable[[TensorSlice], torch.Tensor],
                   counts: Mapping[str, int]) -> Iterator[tuple[TensorSlice, torch.Tensor]]:
    """(segment, its per-unit sums of the metric in fp64 on the CPU) for every scored segment, in
    :func:`scored_tensors` order. ``metric(slice)`` is called once per tensor, cut into its segments."""
    arch = st.arch
    for _, segments in scored_tensors(st):
        whole = metric(segments[0])  # (out, in) of the whole tensor
        for s in segments:
            start, length = arch.segment_span(s, counts)
            seg = whole.narrow(s.axis, start, length)  # this segment's rows (axis 0) or columns (axis 1)
            yield s, per_unit(s, seg, counts[s.space], arch.space_width(s.space)).double().cpu()
        del whole


def fold(st: Structures, values: Iterable[tuple[TensorSlice, torch.Tensor]],
         counts: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment per-unit values (:func:`segment_values`' order) -> per structure: (attention units,),
    (channels,) fp64, added segment after segment in the order given."""
    units = counts["kv"] if st.attention_kind == "group" else counts["q"]
    attn = torch.zeros(units, dtype=torch.float64)
    mlp = torch.zeros(counts["mlp"], dtype=torch.float64)
    for s, per in values:
        if s.space == "mlp":
            mlp += per
        else:
            attn += fold_attention(st, s, per)
    return attn, mlp


def aggregate(st: Structures, metric: Callable[[TensorSlice], torch.Tensor],
              counts: Mapping[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum a per-weight metric over the weights each structure owns: (attention units,), (channels,) fp64.

    ``metric(slice)`` gives the (out, in) metric of the whole weight tensor ``slice.name`` of the layer; it is
    called once per tensor and cut into its segments (a fused tensor: one per segment it holds). ``counts``:
    units per index space of the tensors (default the base model's; a compacted layer's: then the values
    are per unit present, in its order). A sharded build (``distributed.py``) computes the same per-segment
    values from each rank's shard and folds them alike.
    """
    counts = counts or st.arch.counts()
    return fold(st, segment_values(st, metric, counts), counts)


def weight_times_grad(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|W ⊙ G| in fp32 on W's device, with one fp32 temporary (W is widened inside the product; a gradient
    accumulated elsewhere, e.g. in host memory, is brought over first)."""
    return torch.mul(w, g.to(w.device, torch.float32)).abs_()


def layer_scores(
    st: Structures,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    counts: Mapping[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GISP scores of one layer: (attention units,), (mlp channels,) in float64.

    ``weights``/``grads`` are keyed by the slice name inside the layer (e.g. "mlp.up_proj.weight");
    ``grads`` holds the objective's mean gradient. ``counts``: see :func:`aggregate`.
    """
    return aggregate(st, lambda s: weight_times_grad(weights[s.name], grads[s.name]), counts)


def normalise(st: Structures, attn: torch.Tensor, mlp: torch.Tensor,
              normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise normalisation (GISP.md): heads / (4·d_h·d), channels / (3·I)."""
    arch = st.arch
    return attn / arch.normaliser(st.attention_kind, normalisation), mlp / arch.normaliser("channel", normalisation)
