"""Removal order + target → kept indices per layer (pure: numpy only, no files, no devices).

A *width policy* decides how many heads and channels each layer keeps, and which. Each policy is one
registered entry (``register_width_policy(WidthPolicy(...))``): a typed, frozen config class bound to a function
``(ranking, target, config) -> tuple[LayerKeep, ...]``. A variant is kept widths (this module) × a
writer (``nestprune.variant.writers``). The policies:

``per-layer``  the exact GISP subnetwork: the complement of the shortest removal prefix that reaches the
               target, so every layer keeps its own number of heads and channels.
``uniform``    the same width in every layer (never-pruned layers included), so a stock config holds. The
               widths at removal prefix p are the mean kept widths of the per-layer subnetwork at p,
               rounded (heads to a count a stock config holds); the prefix is the one, among all the
               ranking reached, whose uniform widths come nearest the target (``uniform_prefix``: ties go
               to the larger model), so the size reached is the nearest a nested uniform variant can
               reach. Inside each layer the kept structures are the last ones the global order removes.
               GQA query-head mode keeps the same number of query heads in every KV group; group mode
               keeps whole groups; at least one head / group per layer.

Every policy config carries the ``multiple_of`` rounding: kept channel counts rounded to the nearest
multiple (capped at the full width; ``round_channels``); the sparsity actually reached is reported as
``achieved_sparsity``, and the command line warns when it is more than ``REACH_MARGIN`` from the request.

Nested by construction: within a layer the kept set is always a suffix of the layer's removal order, and
every kept width is a non-decreasing function of the kept count of the prefix, so for s1 < s2 the kept
heads/channels of s2 are a subset of those of s1 in every layer (see ``is_nested``).

Under GQA query-head mode a KV head none of whose query heads is kept is dropped from the variant (it can
no longer influence any output); ``achieved_sparsity`` counts it as removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from nestprune.arch import KIND_CODES, ArchInfo, GqaMode, Space, Structures
from nestprune.entries import Entries
from nestprune.errors import NestpruneError
from nestprune.ranking import Ranking, kept_counts


@dataclass(frozen=True)
class LayerKeep:
    """What one decoder layer keeps, as ascending original indices."""

    heads: np.ndarray  # int64 (h,) kept query heads
    kv_heads: np.ndarray  # int64 (k,) kept key/value heads
    kv_of_head: np.ndarray  # int64 (h,) position in ``kv_heads`` of the KV head each kept query head reads
    channels: np.ndarray  # int64 (c,) kept MLP channels

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def intermediate_size(self) -> int:
        return len(self.channels)

    @property
    def uniform_groups(self) -> int | None:
        """Query heads per KV head when ``repeat_kv`` reproduces ``kv_of_head`` (else None)."""
        return uniform_groups(self.kv_of_head, self.num_kv_heads)


def uniform_groups(kv_of_head: np.ndarray, num_kv_heads: int) -> int | None:
    """g if ``kv_of_head`` == [0]*g + [1]*g + … (what ``repeat_kv`` with g groups computes), else None."""
    h, k = len(kv_of_head), num_kv_heads
    if k == 0 or h % k:
        return None
    expected = np.repeat(np.arange(k), h // k)
    return h // k if np.array_equal(np.asarray(kv_of_head), expected) else None


@dataclass(frozen=True)
class VariantSpec:
    """Which heads and channels of every layer a variant keeps, and the sparsity that gives."""

    structures: Structures
    widths: WidthConfig  # the policy config the kept widths come from
    layers: tuple[LayerKeep, ...]
    requested_sparsity: float
    achieved_sparsity: float
    prefix_len: int  # removal prefix the widths come from (per-layer without rounding: exactly removed)
    decoder_params: int  # base decoder-layer parameters (the denominator of sparsity)
    kept_decoder_params: int

    @property
    def arch(self) -> ArchInfo:
        return self.structures.arch

    @property
    def gqa_mode(self) -> GqaMode:
        return self.structures.gqa_mode

    @property
    def layout(self) -> str:
        """The width policy's name (``--layout``)."""
        return self.widths.name

    @property
    def multiple_of(self) -> int | None:
        return self.widths.multiple_of

    @property
    def same_in_every_layer(self) -> bool:
        """Every layer keeps the same widths by construction, so a stock config of the family holds."""
        return width_policy(self.layout).same_in_every_layer

    @property
    def total_params(self) -> int:
        """Parameters of the variant: kept decoder layers + embeddings, lm_head and final norm."""
        return self.kept_decoder_params + non_decoder_params(self.arch)

    def units(self, layer: int) -> np.ndarray:
        """Kept attention units of ``layer``: KV groups in group mode, else query heads."""
        keep = self.layers[layer]
        return keep.kv_heads if self.structures.attention_kind == "group" else keep.heads

    def space_index(self, layer: int, space: Space) -> np.ndarray:
        """Kept units of one index space (q heads, kv heads or channels). (n_kept,)"""
        keep = self.layers[layer]
        return {"q": keep.heads, "kv": keep.kv_heads, "mlp": keep.channels}[space]

    def rows(self, layer: int, space: Space) -> np.ndarray:
        """Kept element indices of one index space, units expanded by their width. (n_kept * width,)"""
        return expand(self.space_index(layer, space), self.arch.space_width(space))


def expand(units: np.ndarray, width: int) -> np.ndarray:
    """[1, 3], width 2 -> [2, 3, 6, 7]. (len(units) * width,)"""
    units = np.asarray(units, dtype=np.int64)
    return (units[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def non_decoder_params(arch: ArchInfo) -> int:
    """Embeddings, lm_head (unless tied) and the final norm: never pruned."""
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size


def sparsity_for_params(ranking: Ranking, params: int) -> float:
    """Parameter sparsity at which the whole model holds ``params`` parameters."""
    other = non_decoder_params(ranking.arch)
    total = ranking.decoder_params + other
    if params > total:
        raise NestpruneError(f"--params {params:,} is more than the base model has ({total:,})")
    if params <= other:
        raise NestpruneError(f"--params {params:,} is not more than the embeddings and lm_head alone ({other:,})")
    return 1.0 - (params - other) / ranking.decoder_params


def stock_head_count_ok(arch: ArchInfo, num_heads: int) -> bool:
    """Can a stock (uniform) config hold ``num_heads``? Family knowledge: arch.Family.stock_heads."""
    return arch.stock_head_count_ok(num_heads)


def nearest(candidates: list[int], x: float) -> int:
    """The candidate closest to ``x`` (ties: the larger). Monotone in ``x``, so nestedness survives."""
    return min(candidates, key=lambda c: (abs(c - x), -c))


def round_to_multiple(x: float, m: int) -> int:
    """Nearest multiple of ``m`` (halves up): monotone in ``x``, so nestedness survives rounding."""
    return int(np.floor(x / m + 0.5)) * m


def round_channels(x: float, full: int, multiple_of: int | None, nonzero: bool = False) -> int:
    """The ``multiple_of`` rounding of a kept channel count: the nearest multiple, at most ``full``, and with
    ``nonzero`` at least one multiple (or ``full``). Monotone in ``x``, so nestedness survives."""
    m = multiple_of or 1
    return min(max(round_to_multiple(x, m), min(m, full) if nonzero else 0), full)


def last_removed(ranking: Ranking, layer: int, kind: int, keep: int) -> np.ndarray:
    """The ``keep`` structures of one layer the global order removes last, ascending. (keep,)"""
    order = ranking.layer_order(layer, kind)
    return np.sort(order[len(order) - keep:]).astype(np.int64) if keep > 0 else np.zeros(0, np.int64)


def keep_from_units(st: Structures, units: np.ndarray, channels: np.ndarray) -> LayerKeep:
    """Expand kept attention units (heads or groups) into query heads, KV heads and the head→KV map."""
    arch = st.arch
    units = np.sort(np.asarray(units, dtype=np.int64))
    if st.attention_kind == "group":
        gs = arch.group_size
        heads = expand(units, gs)  # group g owns query heads [g*gs, (g+1)*gs)
        kv_heads = units
    elif arch.is_gqa:  # query-head mode: KV heads read by at least one kept query head
        heads = units
        kv_heads = np.unique(units // arch.group_size)
    else:  # MHA: head h is KV head h
        heads = units
        kv_heads = units
    kv_of_head = np.searchsorted(kv_heads, heads // arch.group_size).astype(np.int64)
    return LayerKeep(heads=frozen(heads), kv_heads=frozen(kv_heads), kv_of_head=frozen(kv_of_head),
                     channels=frozen(np.sort(np.asarray(channels, dtype=np.int64))))


def frozen(a: np.ndarray) -> np.ndarray:
    """A read-only int64 copy, so a frozen VariantSpec cannot be changed through its arrays."""
    a = np.array(a, dtype=np.int64)
    a.flags.writeable = False
    return a


# --- the width policies ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What a variant is asked for: a parameter sparsity, and the shortest removal prefix that reaches it."""

    sparsity: float
    prefix_len: int


class WidthConfig(Protocol):
    """A width policy's typed config: its registered name plus the ``multiple_of`` rounding."""

    name: ClassVar[str]

    @property
    def multiple_of(self) -> int | None: ...


def check_multiple_of(multiple_of: int | None) -> None:
    if multiple_of is not None and (isinstance(multiple_of, bool) or not isinstance(multiple_of, int)
                                    or multiple_of < 1):
        raise NestpruneError(f"--multiple-of must be a positive integer, got {multiple_of}")


WidthFn = Callable[[Ranking, Target, Any], tuple[LayerKeep, ...]]
PrefixFn = Callable[[Ranking, float, Any], int]
REACH_MARGIN = 0.01  # the command line warns when |achieved - requested sparsity| is larger than this


def reach_gap(spec: VariantSpec) -> float:
    """How far the sparsity reached is from the one requested."""
    return abs(spec.achieved_sparsity - spec.requested_sparsity)


def shortest_prefix(ranking: Ranking, sparsity: float, config: Any) -> int:
    """The shortest removal prefix whose parameter sparsity reaches ``sparsity`` (the per-layer rule)."""
    return ranking.prefix_for_sparsity(sparsity)


@dataclass(frozen=True)
class WidthPolicy:
    """A registered width policy: its config class, the function it is bound to, and what writers need."""

    config: type  # a frozen dataclass with ``name`` (the --layout value) and ``multiple_of``
    keep: WidthFn  # (ranking, target, config) -> what every layer keeps
    same_in_every_layer: bool  # True: a stock config of the family holds (writers write one)
    help: str
    # (ranking, sparsity, config) -> the removal prefix the widths are planned from; it must be non-decreasing
    # in the sparsity (so that variants stay nested) and refuse a sparsity beyond the ranking
    prefix: PrefixFn = shortest_prefix

    @property
    def name(self) -> str:
        return self.config.name


WIDTH_POLICIES: Entries[WidthPolicy] = Entries("layout")
register_width_policy = WIDTH_POLICIES.register
width_policy = WIDTH_POLICIES.find


def width_config(layout: str, multiple_of: int | None = None) -> WidthConfig:
    """The config of policy ``layout`` (``--layout``) with the ``--multiple-of`` rounding."""
    return width_policy(layout).config(multiple_of=multiple_of)


@dataclass(frozen=True)
class PerLayer:
    name: ClassVar[str] = "per-layer"
    multiple_of: int | None = None

    def __post_init__(self) -> None:
        check_multiple_of(self.multiple_of)


@dataclass(frozen=True)
class Uniform:
    name: ClassVar[str] = "uniform"
    multiple_of: int | None = None

    def __post_init__(self) -> None:
        check_multiple_of(self.multiple_of)


def per_layer_keeps(ranking: Ranking, target: Target, config: PerLayer) -> tuple[LayerKeep, ...]:
    arch, attn_kind, ch_kind = ranking.arch, ranking.attention_kind, KIND_CODES["channel"]
    attn_kept, mlp_kept = kept_counts(ranking, target.prefix_len)
    keeps = []
    for layer in range(arch.num_layers):
        c = round_channels(int(mlp_kept[layer]), arch.intermediate_size, config.multiple_of)
        units = last_removed(ranking, layer, attn_kind, int(attn_kept[layer]))
        keeps.append(keep_from_units(ranking.structures, units, last_removed(ranking, layer, ch_kind, c)))
    return tuple(keeps)


def uniform_widths(ranking: Ranking, prefix_len: int, multiple_of: int | None) -> tuple[int, int]:
    """(attention units per layer — query heads per KV group in GQA query mode —, channels per layer)."""
    arch = ranking.arch
    attn_kept, mlp_kept = kept_counts(ranking, prefix_len)
    mean_units = attn_kept.mean()
    if arch.is_gqa and ranking.gqa_mode == "query":  # query heads per KV group, every group kept
        candidates, heads_per, goal = range(1, arch.group_size + 1), arch.num_kv_heads, mean_units / arch.num_kv_heads
    else:  # heads, or whole groups
        candidates, goal = range(1, ranking.structures.attention_units + 1), mean_units
        heads_per = arch.group_size if ranking.structures.attention_kind == "group" else 1
    attn = nearest([u for u in candidates if stock_head_count_ok(arch, u * heads_per)], goal)
    return attn, round_channels(mlp_kept.mean(), arch.intermediate_size, multiple_of, nonzero=True)


def uniform_sparsity(ranking: Ranking, prefix_len: int, config: Uniform) -> float:
    """Parameter sparsity of the uniform variant planned from removal prefix ``prefix_len``."""
    layers = uniform_keeps(ranking, Target(0.0, prefix_len), config)
    return 1.0 - kept_decoder_params(ranking.arch, ranking.decoder_params, layers) / ranking.decoder_params


def uniform_prefix(ranking: Ranking, sparsity: float, config: Uniform) -> int:
    """The removal prefix (0 … what the build removed) whose uniform variant comes nearest ``sparsity``.

    Uniform sparsity is non-decreasing in the prefix (both widths are), so a bisection finds the first prefix
    reaching the target; it or the one before is the nearest (ties: the one before, the larger model). The
    choice is non-decreasing in ``sparsity``, so uniform variants stay nested."""
    ranking.prefix_for_sparsity(sparsity)  # refuses a sparsity out of range or beyond what was ranked
    lo, hi = 0, ranking.num_removed
    if uniform_sparsity(ranking, hi, config) < sparsity:
        return hi
    while lo < hi:  # first prefix whose uniform sparsity reaches the target
        mid = (lo + hi) // 2
        if uniform_sparsity(ranking, mid, config) >= sparsity:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and sparsity - uniform_sparsity(ranking, lo - 1, config) <= uniform_sparsity(ranking, lo, config) - sparsity:
        return lo - 1
    return lo


def uniform_keeps(ranking: Ranking, target: Target, config: Uniform) -> tuple[LayerKeep, ...]:
    arch, attn_kind, ch_kind = ranking.arch, ranking.attention_kind, KIND_CODES["channel"]
    attn, channels = uniform_widths(ranking, target.prefix_len, config.multiple_of)
    keeps = []
    for layer in range(arch.num_layers):
        if arch.is_gqa and ranking.gqa_mode == "query":
            order = ranking.layer_order(layer, attn_kind)  # (num_heads,) first removed → last removed
            units = np.concatenate([order[order // arch.group_size == g][arch.group_size - attn:]
                                    for g in range(arch.num_kv_heads)])
        else:
            units = last_removed(ranking, layer, attn_kind, attn)
        keeps.append(keep_from_units(ranking.structures, units, last_removed(ranking, layer, ch_kind, channels)))
    return tuple(keeps)


register_width_policy(WidthPolicy(PerLayer, per_layer_keeps, same_in_every_layer=False,
                                  help="the exact GISP subnetwork (load with nestprune.load_variant)"))
register_width_policy(WidthPolicy(Uniform, uniform_keeps, same_in_every_layer=True,
                                  help="the same width in every layer, a stock config (the nearest size it "
                                  "reaches; a warning says when that is more than 0.01 from the request)",
                                  prefix=uniform_prefix))


def kept_decoder_params(arch: ArchInfo, decoder_params: int, layers: tuple[LayerKeep, ...]) -> int:
    """Base decoder parameters minus the rows/columns (and bias entries) the variant drops."""
    removed = 0
    for keep in layers:
        kept = {"q": keep.num_heads, "kv": keep.num_kv_heads, "mlp": keep.intermediate_size}
        for s in arch.slices():
            per_elem = 1 if s.name.endswith(".bias") else arch.hidden_size
            removed += (arch.space_size(s.space) - kept[s.space]) * arch.space_width(s.space) * per_elem
    return decoder_params - removed


def plan_widths(ranking: Ranking, sparsity: float, widths: WidthConfig) -> VariantSpec:
    """Kept heads and channels of every layer for a parameter-sparsity target (GISP.md, "Sparsity")."""
    policy = width_policy(widths.name)
    if not isinstance(widths, policy.config):
        raise NestpruneError(f"internal: {widths!r} is not a {policy.config.__name__}")
    target = Target(float(sparsity), policy.prefix(ranking, float(sparsity), widths))
    layers = policy.keep(ranking, target, widths)
    kept = kept_decoder_params(ranking.arch, ranking.decoder_params, layers)
    return VariantSpec(
        structures=ranking.structures, widths=widths, layers=layers,
        requested_sparsity=target.sparsity, achieved_sparsity=1.0 - kept / ranking.decoder_params,
        prefix_len=target.prefix_len, decoder_params=ranking.decoder_params, kept_decoder_params=kept,
    )


def plan_variant(ranking: Ranking, sparsity: float, layout: str = "per-layer",
                 multiple_of: int | None = None) -> VariantSpec:
    """``plan_widths`` with the policy named as on the command line (``--layout``, ``--multiple-of``)."""
    return plan_widths(ranking, sparsity, width_config(layout, multiple_of))


def is_nested(larger: VariantSpec, smaller: VariantSpec) -> bool:
    """True if every head, KV head and channel ``smaller`` keeps is also kept by ``larger``, in every layer."""
    if len(larger.layers) != len(smaller.layers):
        return False
    for big, small in zip(larger.layers, smaller.layers, strict=True):
        for a, b in ((big.heads, small.heads), (big.kv_heads, small.kv_heads), (big.channels, small.channels)):
            if not np.isin(b, a).all():
                return False
    return True
