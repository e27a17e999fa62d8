"""Model families: the one place that knows how a family lays out its decoder layers.

One declarative ``Family`` entry per family says which rows/columns of which tensors are query head h,
KV head g or MLP channel j (segments of fused tensors included), which other tensors a layer holds
(norms, biases that are never sliced), where the modules live, which head counts a stock config may
hold, which widths the attention reads from the global config, and the config defaults that matter.
Everything else (scores, masks, costs, kept indices, the registry layout, loading) asks this module;
a new family is a new entry, never a copied module or an ``if family == ...``.

Index spaces:
  ``q``   query heads     (unit width = head_dim)
  ``kv``  key/value heads (unit width = head_dim)
  ``mlp`` MLP channels    (unit width = 1)

Segments: a ``TensorSlice`` is one segment of a tensor along its pruned axis. Most tensors are one
segment; a fused tensor lists several, in memory order (Phi-3 ``qkv_proj``: q rows, then k rows, then
v rows; ``gate_up_proj``: gate rows, then up rows). A segment's offset follows from the sizes of the
segments before it (``ArchInfo.segment_span``), so every consumer works per segment through
``ArchInfo.tensor_index`` / ``segment_span`` instead of special cases.

Structures (what GISP ranks):
  ``head``    one query head. MHA: its q/k/v rows and o columns. GQA query-head mode (the
              reference's): q rows and o columns only; k/v are never pruned.
  ``group``   GQA KV-group mode: one KV head with its query heads (q/k/v rows, o columns).
  ``channel`` one MLP channel: row of gate/up, column of down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nestprune.errors import NestpruneError

Space = Literal["q", "kv", "mlp"]
Kind = Literal["head", "group", "channel"]
GqaMode = Literal["query", "group"]
StockHeads = Literal["any", "divide-hidden"]

KIND_CODES: dict[str, int] = {"head": 0, "group": 1, "channel": 2}
KIND_NAMES: dict[int, str] = {v: k for k, v in KIND_CODES.items()}
SPACES: tuple[Space, ...] = ("q", "kv", "mlp")
# config.json keys of the widths a space counts (the same in every supported family)
WIDTH_KEYS: dict[Space, str] = {"q": "num_attention_heads", "kv": "num_key_value_heads", "mlp": "intermediate_size"}


@dataclass(frozen=True)
class TensorSlice:
    """One segment of a decoder-layer tensor that structures own: its rows (axis 0) or columns (axis 1)
    in one index space. A tensor that is not fused is one segment."""

    name: str  # key inside the layer, e.g. "self_attn.q_proj.weight"
    space: Space
    axis: int  # 0: rows of the (out, in) weight / the bias vector; 1: columns
    optional: bool = False  # exists only in some checkpoints (biases)
    flag: str | None = None  # optional: the config.json key that says it exists (None: assumed present)
    part: str = ""  # segment label inside a fused tensor ("q", "k", "v", "gate", "up")

    @property
    def module(self) -> str:
        """The module inside the layer that holds the tensor, e.g. "self_attn.q_proj"."""
        return self.name.rsplit(".", 1)[0]

    @property
    def is_bias(self) -> bool:
        return self.name.endswith(".bias")


@dataclass(frozen=True)
class FixedTensor:
    """A decoder-layer tensor no structure owns (norms, output biases): never sliced, counted in sparsity."""

    name: str
    size: Literal["hidden", "head_dim"] = "hidden"  # its one dimension
    optional: bool = False
    flag: str | None = None


@dataclass(frozen=True)
class Family:
    """How one model family lays out a decoder layer (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    slices: tuple[TensorSlice, ...]  # every prunable segment; segments of one tensor in memory order
    fixed: tuple[FixedTensor, ...] = ()  # every other tensor of a decoder layer
    layer_prefix: str = "model.layers.{}."
    attention: str = "self_attn"  # attention module inside a layer
    mlp: str = "mlp"  # MLP module inside a layer
    # which query-head counts a stock transformers config of the family accepts
    stock_heads: StockHeads = "any"
    # widths the attention forward reads from the global config rather than from its modules (Phi-3 splits
    # qkv at config.num_attention_heads); a per-layer variant gives each resized layer its own view
    attention_config_keys: tuple[str, ...] = ()
    # transformers' config class checks longrope factor lists against hidden_size // num_attention_heads (Phi-3)
    rope_factors_follow_heads: bool = False
    # config keys whose (truthy) value needs eager attention: SDPA cannot soft-cap attention logits (transformers
    # 5.24 refuses, 5.17 silently skips the cap)
    eager_attention_if: tuple[str, ...] = ()
    # transformers' config defaults that differ from the generic fallbacks (used when config.json omits them)
    config_defaults: tuple[tuple[str, Any], ...] = ()
    notes: str = ""

    @property
    def layers_path(self) -> str:
        """Module path of the decoder layer list, e.g. "model.layers"."""
        return self.layer_prefix.split("{}")[0].rstrip(".")

    def output_slice(self, space: Space) -> TensorSlice:
        """The layer's output projection of a block (axis-1 segment): o_proj for "q", down_proj for "mlp"."""
        (s,) = [s for s in self.slices if s.axis == 1 and s.space == space and not s.optional]
        return s

    @property
    def output_modules(self) -> tuple[str, str]:
        """Modules whose inputs Wanda-sp's FLAP convention scores: (attention output, MLP output)."""
        return self.output_slice("q").module, self.output_slice("mlp").module

    def stock_head_count_ok(self, hidden_size: int, num_heads: int) -> bool:
        """Can a stock config of this family hold ``num_heads`` query heads?"""
        return self.stock_heads == "any" or hidden_size % num_heads == 0


def _attention(bias_flag: str | None = None, q_bias_always: bool = False) -> tuple[TensorSlice, ...]:
    """q/k/v/o as separate Linear modules (Llama style), with optional q/k/v biases sliced with their rows."""
    out = (
        TensorSlice("self_attn.q_proj.weight", "q", 0),
        TensorSlice("self_attn.k_proj.weight", "kv", 0),
        TensorSlice("self_attn.v_proj.weight", "kv", 0),
        TensorSlice("self_attn.o_proj.weight", "q", 1),
    )
    if bias_flag or q_bias_always:
        flag = None if q_bias_always else bias_flag
        out += tuple(TensorSlice(f"self_attn.{p}_proj.bias", sp, 0, optional=True, flag=flag)
                     for p, sp in (("q", "q"), ("k", "kv"), ("v", "kv")))
    return out


def _mlp(bias_flag: str | None = None) -> tuple[TensorSlice, ...]:
    """gate/up/down as separate Linear modules, with optional gate/up biases sliced with their rows."""
    out = (
        TensorSlice("mlp.gate_proj.weight", "mlp", 0),
        TensorSlice("mlp.up_proj.weight", "mlp", 0),
        TensorSlice("mlp.down_proj.weight", "mlp", 1),
    )
    if bias_flag:
        out += tuple(TensorSlice(f"mlp.{p}_proj.bias", "mlp", 0, optional=True, flag=bias_flag) for p in ("gate", "up"))
    return out


def _fixed(*names: str, size: Literal["hidden", "head_dim"] = "hidden", flag: str | None = None) -> tuple[FixedTensor, ...]:
    return tuple(FixedTensor(n, size, optional=flag is not None, flag=flag) for n in names)


_NORMS = _fixed("input_layernorm.weight", "post_attention_layernorm.weight")
_FF_NORMS = _fixed("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
_QK_NORMS = _fixed("self_attn.q_norm.weight", "self_attn.k_norm.weight", size="head_dim")
_GEMMA_DEFAULTS = (("head_dim", 256), ("num_key_value_heads", 4), ("tie_word_embeddings", True))
_SOFTCAP = ("attn_logit_softcapping",)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _attention("attention_bias") + _mlp("mlp_bias"),
           _NORMS + _fixed("self_attn.o_proj.bias", flag="attention_bias") + _fixed("mlp.down_proj.bias", flag="mlp_bias"),
           stock_heads="divide-hidden",
           notes="Llama-2 (MHA), Llama-3 / DeepSeek-R1-Distill-Llama (GQA); attention_bias/mlp_bias honoured"),
    Family("mistral", ("mistral",), _attention() + _mlp(), _NORMS, notes="Mistral (GQA, no biases)"),
    Family("qwen2", ("qwen2",), _attention(q_bias_always=True) + _mlp(), _NORMS,
           notes="Qwen2/2.5: q/k/v biases (always present) sliced with their rows"),
    Family("qwen3", ("qwen3",), _attention("attention_bias") + _mlp(),
           _NORMS + _QK_NORMS + _fixed("self_attn.o_proj.bias", flag="attention_bias"),
           config_defaults=(("head_dim", 128),),
           notes="Qwen3: q_norm/k_norm act per head over head_dim and are never sliced"),
    Family("phi3", ("phi3",),
           (TensorSlice("self_attn.qkv_proj.weight", "q", 0, part="q"),
            TensorSlice("self_attn.qkv_proj.weight", "kv", 0, part="k"),
            TensorSlice("self_attn.qkv_proj.weight", "kv", 0, part="v"),
            TensorSlice("self_attn.o_proj.weight", "q", 1),
            TensorSlice("mlp.gate_up_proj.weight", "mlp", 0, part="gate"),
            TensorSlice("mlp.gate_up_proj.weight", "mlp", 0, part="up"),
            TensorSlice("mlp.down_proj.weight", "mlp", 1)),
           _NORMS, attention_config_keys=("num_attention_heads",), rope_factors_follow_heads=True,
           notes="Phi-3/3.5/4-mini: fused qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows); the attention "
                 "splits qkv at config.num_attention_heads"),
    Family("gemma2", ("gemma2",), _attention("attention_bias") + _mlp(),
           _NORMS + _FF_NORMS + _fixed("self_attn.o_proj.bias", flag="attention_bias"),
           stock_heads="divide-hidden", eager_attention_if=_SOFTCAP, config_defaults=_GEMMA_DEFAULTS,
           notes="Gemma-2: head_dim independent of hidden/heads, pre/post feed-forward norms, attention and final "
                 "logit soft-capping (eager attention), scaled embeddings (tied by default)"),
    Family("gemma3", ("gemma3_text",), _attention("attention_bias") + _mlp(),
           _NORMS + _FF_NORMS + _QK_NORMS + _fixed("self_attn.o_proj.bias", flag="attention_bias"),
           stock_heads="divide-hidden", eager_attention_if=_SOFTCAP, config_defaults=_GEMMA_DEFAULTS,
           notes="Gemma-3 text (Gemma3ForCausalLM): as Gemma-2 plus q_norm/k_norm per head (never sliced), "
                 "sliding/full layers with their own rotary embeddings"),
)


def supported_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_for(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise NestpruneError(
        f"model_type {model_type!r} is not supported; nestprune supports: {', '.join(supported_model_types())}"
    )


def needs_eager_attention(config: Mapping[str, Any]) -> bool:
    """Does this config.json need eager attention to compute what it says (attention soft-capping)?"""
    fam = next((f for f in FAMILIES if config.get("model_type") in f.model_types), None)
    return fam is not None and any(config.get(key) for key in fam.eager_attention_if)


def join_segments(sizes: Sequence[int], rows: Sequence[np.ndarray]) -> np.ndarray:
    """Indices into a fused tensor from per-segment indices: segment i's indices shifted by the sizes of the
    segments before it, concatenated. ([4, 2], [[1, 3], [0]]) -> [1, 3, 4]. (sum of len(rows[i]),)"""
    starts = np.cumsum(np.asarray([0, *sizes], dtype=np.int64))[: len(sizes)]
    parts = [np.asarray(r, dtype=np.int64) + s for s, r in zip(starts, rows, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


Counts = Mapping[str, int]  # units per index space ("q", "kv", "mlp")


@dataclass(frozen=True)
class ArchInfo:
    """Shapes of a decoder-only model, read from its config (and which optional tensors exist)."""

    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    present_optional: tuple[str, ...] = ()  # optional tensor names (inside a layer) present in the checkpoint

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def fam(self) -> Family:
        return family_for(self.model_type)

    def layer_key(self, layer: int, name: str) -> str:
        return self.fam.layer_prefix.format(layer) + name

    def slices(self) -> tuple[TensorSlice, ...]:
        """The segments present in this checkpoint (optional biases only if present)."""
        return tuple(s for s in self.fam.slices if not s.optional or s.name in self.present_optional)

    def fixed_tensors(self) -> tuple[FixedTensor, ...]:
        """The never-sliced tensors of a layer present in this checkpoint."""
        return tuple(t for t in self.fam.fixed if not t.optional or t.name in self.present_optional)

    def layer_tensor_names(self) -> tuple[str, ...]:
        """Every tensor of one decoder layer (names inside the layer): sliced ones, then fixed ones."""
        return tuple(dict.fromkeys([s.name for s in self.slices()] + [t.name for t in self.fixed_tensors()]))

    # --- index spaces and segments -------------------------------------------------------------------

    def space_width(self, space: Space) -> int:
        return 1 if space == "mlp" else self.head_dim

    def space_size(self, space: Space) -> int:
        return {"q": self.num_heads, "kv": self.num_kv_heads, "mlp": self.intermediate_size}[space]

    def counts(self) -> dict[str, int]:
        """Units per index space of the base model."""
        return {sp: self.space_size(sp) for sp in SPACES}

    def tensor_names(self) -> tuple[str, ...]:
        """The sliced tensors of a layer, each once, in table order."""
        return tuple(dict.fromkeys(s.name for s in self.slices()))

    def segments(self, name: str) -> tuple[TensorSlice, ...]:
        """The segments of tensor ``name`` in memory order (one for a tensor that is not fused; () if unsliced)."""
        return tuple(s for s in self.slices() if s.name == name)

    def segment_length(self, s: TensorSlice, counts: Counts | None = None) -> int:
        """Elements of segment ``s`` along its axis (``counts``: units per space; default the base's)."""
        n = (counts or self.counts())[s.space]
        return n * self.space_width(s.space)

    def segment_span(self, s: TensorSlice, counts: Counts | None = None) -> tuple[int, int]:
        """(start, length) of segment ``s`` along its axis inside its tensor."""
        start = 0
        for seg in self.segments(s.name):
            if seg == s:
                return start, self.segment_length(seg, counts)
            start += self.segment_length(seg, counts)
        raise NestpruneError(f"internal: {s} is not a segment of a {self.family} layer")

    def tensor_length(self, name: str, counts: Counts | None = None) -> int:
        """Length of tensor ``name`` along its pruned axis (sum of its segments)."""
        return sum(self.segment_length(s, counts) for s in self.segments(name))

    def tensor_index(self, name: str, rows: Callable[[TensorSlice], np.ndarray], counts: Counts | None = None) -> np.ndarray:
        """Indices along the pruned axis of tensor ``name`` from per-segment indices ``rows(segment)`` (0-based
        inside each segment), segments laid out with ``counts`` units per space (default: the base's).

        The one helper every consumer uses for fused and plain tensors alike: the kept rows of a variant
        (rows = kept element indices of the segment's space), the registry's nested permutation (rows = the
        space's units in stored order), the K/V gather at load. (n,) int64, ascending within each segment
        when ``rows`` are."""
        segs = self.segments(name)
        return join_segments([self.segment_length(s, counts) for s in segs], [rows(s) for s in segs])

    def tensor_shape(self, s: TensorSlice, counts: Counts | None = None) -> tuple[int, ...]:
        """Shape of the whole tensor segment ``s`` belongs to."""
        n = self.tensor_length(s.name, counts)
        if s.is_bias:
            return (n,)
        return (n, self.hidden_size) if s.axis == 0 else (self.hidden_size, n)

    def linear_shapes(self, counts: Counts | None = None) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every sliced Linear module of a layer with ``counts`` units per space,
        keyed by module path inside the layer (e.g. "self_attn.qkv_proj")."""
        out: dict[str, tuple[int, int]] = {}
        for name in self.tensor_names():
            s = self.segments(name)[0]
            if not s.is_bias:
                shape = self.tensor_shape(s, counts)
                out[s.module] = (shape[0], shape[1])
        return out

    def fixed_shape(self, t: FixedTensor) -> tuple[int]:
        return (self.hidden_size if t.size == "hidden" else self.head_dim,)

    def layer_params(self) -> int:
        """Parameters of one decoder layer of the base model, from the table (norms and biases included)."""
        sliced = sum(int(np.prod(self.tensor_shape(self.segments(n)[0]))) for n in self.tensor_names())
        return sliced + sum(int(np.prod(self.fixed_shape(t))) for t in self.fixed_tensors())

    # --- costs --------------------------------------------------------------------------------------

    def structure_cost(self, kind: Kind) -> int:
        """Parameters one structure of this kind holds (weights and biases), from the table."""
        total = 0
        for s in self.slices():
            if kind == "channel":
                if s.space != "mlp":
                    continue
                per_unit = 1
            else:
                if s.space == "mlp" or not Structures(self, "group" if kind == "group" else "query").owns(s.space):
                    continue
                if kind == "group":
                    per_unit = self.group_size if s.space == "q" else 1
                else:
                    per_unit = 1
            other = 1 if s.is_bias else self.hidden_size
            total += per_unit * self.space_width(s.space) * other
        return total

    def normaliser(self, kind: Kind, normalisation: str) -> float:
        """Block-wise normalisation constant (GISP.md): head 4*d_h*d, channel 3*I (gated MLP).

        KV groups (nestprune's extension) use the head constant times the query heads per group.
        ``normalisation='none'`` divides by 1.
        """
        if normalisation == "none":
            return 1.0
        if normalisation != "reference":
            raise NestpruneError(f"unknown normalisation {normalisation!r} (use 'reference' or 'none')")
        head = 4.0 * self.head_dim * self.hidden_size
        if kind == "head":
            return head
        if kind == "group":
            return head * self.group_size
        return 3.0 * self.intermediate_size

    def prunable_layers(self, skip_first_frac: float = 0.1, skip_last: int = 1) -> list[int]:
        """The reference prunes range(int(0.1*L), L-1): first layers and the last one are never pruned."""
        return list(range(int(skip_first_frac * self.num_layers), self.num_layers - skip_last))

    # --- configs of variants ------------------------------------------------------------------------

    def stock_head_count_ok(self, num_heads: int) -> bool:
        """Can a stock config of this family hold ``num_heads`` query heads (head_dim written explicitly)?"""
        return self.fam.stock_head_count_ok(self.hidden_size, num_heads)

    def stock_config(self, base_config: Mapping[str, Any], counts: Counts) -> dict[str, Any]:
        """The config.json of a uniform variant with ``counts`` units per space in every layer: a stock config
        that plain ``AutoModelForCausalLM.from_pretrained`` loads. Raises if the family's config cannot hold it."""
        cfg = dict(base_config)
        h = int(counts["q"])
        if not self.stock_head_count_ok(h):
            raise NestpruneError(f"a stock {self.family} config cannot hold {h} attention heads "
                                 f"(hidden_size {self.hidden_size} is not a multiple); use the per-layer layout")
        if self.fam.rope_factors_follow_heads:
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            prf = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
            need = int(self.hidden_size // h * prf) // 2
            for key in ("short_factor", "long_factor"):
                if rope.get(key) is not None and len(rope[key]) != need:
                    raise NestpruneError(
                        f"transformers checks this {self.family} config's rope {key} ({len(rope[key])} values) "
                        f"against hidden_size // num_attention_heads, so a stock config cannot hold {h} heads; "
                        "use the per-layer layout")
        cfg.update({WIDTH_KEYS["q"]: h, WIDTH_KEYS["kv"]: int(counts["kv"]), "head_dim": self.head_dim,
                    WIDTH_KEYS["mlp"]: int(counts["mlp"])})
        return cfg

    def attention_config(self, counts: Counts) -> dict[str, int]:
        """Config values the attention of a layer with ``counts`` units must see (its per-layer view)."""
        space_of = {v: k for k, v in WIDTH_KEYS.items()}
        return {key: int(counts[space_of[key]]) for key in self.fam.attention_config_keys}


@dataclass(frozen=True)
class Structures:
    """What GISP ranks in one model: its shapes and how its attention is cut into units.

    ``gqa_mode`` only matters for GQA models: ``query`` ranks query heads (q rows and o columns; K/V are
    never pruned), ``group`` ranks KV groups (a KV head with its query heads). Under MHA a unit is a head
    with its own q/k/v rows and o columns in either mode.
    """

    arch: ArchInfo
    gqa_mode: GqaMode = "query"

    @property
    def attention_kind(self) -> Kind:
        return "group" if (self.arch.is_gqa and self.gqa_mode == "group") else "head"

    @property
    def attention_code(self) -> int:
        return KIND_CODES[self.attention_kind]

    @property
    def attention_units(self) -> int:
        """Attention units per layer: KV groups in group mode, else query heads."""
        return self.arch.num_kv_heads if self.attention_kind == "group" else self.arch.num_heads

    def owns(self, space: Space) -> bool:
        """Does an attention unit own part of this index space? (channels always own 'mlp')."""
        if space in ("q", "mlp"):
            return True
        # kv rows belong to an attention unit under MHA (head h is kv head h) or in group mode.
        return not self.arch.is_gqa or self.gqa_mode == "group"

    def scored_slices(self) -> tuple[TensorSlice, ...]:
        """The weight segments whose gradients the score needs (biases excluded; GQA query mode: no k/v)."""
        return tuple(s for s in self.arch.slices() if not s.is_bias and self.owns(s.space))

    def cost(self, kind: Kind) -> int:
        return self.arch.structure_cost(kind)


def _cfg(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = config.get(key, default)
    if v is None and default is None:
        raise NestpruneError(f"config.json has no {key!r}")
    return v


def arch_from_config(config: Mapping[str, Any], weight_names: set[str] | None = None) -> ArchInfo:
    """Read an ArchInfo from a config.json dict; ``weight_names`` tells which optional tensors exist."""
    model_type = config.get("model_type")
    if not model_type:
        raise NestpruneError("config.json has no 'model_type'; is this a Hugging Face model directory?")
    fam = family_for(model_type)
    cfg = {**dict(fam.config_defaults), **{k: v for k, v in config.items() if v is not None}}
    hidden = int(_cfg(cfg, "hidden_size"))
    heads = int(_cfg(cfg, "num_attention_heads"))
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = cfg.get("intermediate_size")
    if not isinstance(inter, int):
        raise NestpruneError("config.json's intermediate_size must be one integer (per-layer widths are a variant, "
                             "not a base model)")
    if heads % kv:
        raise NestpruneError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    optional = [t for t in (*fam.slices, *fam.fixed) if t.optional]
    if weight_names is not None:
        prefix = fam.layer_prefix.format(0)
        present = [t.name for t in optional if prefix + t.name in weight_names]
    else:  # from the config flags alone
        present = [t.name for t in optional if t.flag is None or cfg.get(t.flag)]
    return ArchInfo(
        family=fam.name,
        model_type=model_type,
        num_layers=int(_cfg(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=int(_cfg(cfg, "vocab_size")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        present_optional=tuple(dict.fromkeys(present)),
    )


def decoder_param_count(model: Any, arch: ArchInfo) -> int:
    """Parameters of the decoder layers of a loaded model (norms included; embeddings and lm_head not)."""
    prefix = arch.fam.layer_prefix.split("{}")[0]
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
