"""Model families: one declarative table says which rows/columns of which tensors are head h,
KV group g or MLP channel j. Everything else (scores, masks, costs, slicing) reads this table;
a new family is a new entry, never a copied module.

Index spaces:
  ``q``   query heads     (unit width = head_dim)
  ``kv``  key/value heads (unit width = head_dim)
  ``mlp`` MLP channels    (unit width = 1)

Structures (what GISP ranks):
  ``head``    one query head. MHA: its q/k/v rows and o columns. GQA query-head mode (the
              reference's): q rows and o columns only; k/v are never pruned.
  ``group``   GQA KV-group mode: one KV head with its query heads (q/k/v rows, o columns).
  ``channel`` one MLP channel: row of gate/up, column of down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nestprune.errors import NestpruneError

Space = Literal["q", "kv", "mlp"]
Kind = Literal["head", "group", "channel"]
GqaMode = Literal["query", "group"]

KIND_CODES: dict[str, int] = {"head": 0, "group": 1, "channel": 2}
KIND_NAMES: dict[int, str] = {v: k for k, v in KIND_CODES.items()}


@dataclass(frozen=True)
class TensorSlice:
    """One tensor of a decoder layer that a structure owns part of."""

    name: str  # key inside the layer, e.g. "self_attn.q_proj.weight"
    space: Space
    axis: int  # 0: rows of the (out, in) weight / the bias vector; 1: columns
    optional: bool = False  # biases exist only in some checkpoints


@dataclass(frozen=True)
class Family:
    """How one model family lays out prunable structures inside a decoder layer."""

    name: str
    model_types: tuple[str, ...]
    slices: tuple[TensorSlice, ...]
    layer_prefix: str = "model.layers.{}."
    notes: str = ""


_ATTN_MLP = (
    TensorSlice("self_attn.q_proj.weight", "q", 0),
    TensorSlice("self_attn.k_proj.weight", "kv", 0),
    TensorSlice("self_attn.v_proj.weight", "kv", 0),
    TensorSlice("self_attn.o_proj.weight", "q", 1),
    TensorSlice("mlp.gate_proj.weight", "mlp", 0),
    TensorSlice("mlp.up_proj.weight", "mlp", 0),
    TensorSlice("mlp.down_proj.weight", "mlp", 1),
)
_OPTIONAL_BIASES = (
    TensorSlice("self_attn.q_proj.bias", "q", 0, optional=True),
    TensorSlice("self_attn.k_proj.bias", "kv", 0, optional=True),
    TensorSlice("self_attn.v_proj.bias", "kv", 0, optional=True),
    TensorSlice("mlp.gate_proj.bias", "mlp", 0, optional=True),
    TensorSlice("mlp.up_proj.bias", "mlp", 0, optional=True),
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _ATTN_MLP + _OPTIONAL_BIASES,
           notes="Llama-2 (MHA), Llama-3 / DeepSeek-R1-Distill-Llama (GQA); attention_bias/mlp_bias honoured"),
    Family("mistral", ("mistral",), _ATTN_MLP, notes="Mistral (GQA, no biases)"),
    Family("qwen2", ("qwen2",), _ATTN_MLP + _OPTIONAL_BIASES, notes="Qwen2/2.5: q/k/v biases sliced with their rows"),
    Family("qwen3", ("qwen3",), _ATTN_MLP + _OPTIONAL_BIASES,
           notes="Qwen3: q_norm/k_norm act per head over head_dim and are never sliced"),
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
    present_optional: tuple[str, ...] = ()  # optional slice names present in the checkpoint

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
        """The slices present in this checkpoint (optional biases only if present)."""
        return tuple(s for s in self.fam.slices if not s.optional or s.name in self.present_optional)

    def space_width(self, space: Space) -> int:
        return 1 if space == "mlp" else self.head_dim

    def space_size(self, space: Space) -> int:
        return {"q": self.num_heads, "kv": self.num_kv_heads, "mlp": self.intermediate_size}[space]

    def tensor_shape(self, s: TensorSlice) -> tuple[int, ...]:
        n = self.space_size(s.space) * self.space_width(s.space)
        if s.name.endswith(".bias"):
            return (n,)
        return (n, self.hidden_size) if s.axis == 0 else (self.hidden_size, n)

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
            other = 1 if s.name.endswith(".bias") else self.hidden_size
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
        """The weight tensors whose gradients the score needs (biases excluded; GQA query mode: no k/v)."""
        return tuple(s for s in self.arch.slices() if s.name.endswith(".weight") and self.owns(s.space))

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
    text_cfg = config
    hidden = int(_cfg(text_cfg, "hidden_size"))
    heads = int(_cfg(text_cfg, "num_attention_heads"))
    kv = int(text_cfg.get("num_key_value_heads") or heads)
    head_dim = int(text_cfg.get("head_dim") or hidden // heads)
    inter = text_cfg.get("intermediate_size")
    if not isinstance(inter, int):
        raise NestpruneError("config.json's intermediate_size must be one integer (per-layer widths are a variant, "
                             "not a base model)")
    if heads % kv:
        raise NestpruneError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    present: tuple[str, ...] = ()
    if weight_names is not None:
        prefix = fam.layer_prefix.format(0)
        present = tuple(s.name for s in fam.slices if s.optional and prefix + s.name in weight_names)
    else:  # from the config flags alone
        names = []
        if config.get("attention_bias") or model_type == "qwen2":
            names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if config.get("mlp_bias"):
            names += ["mlp.gate_proj.bias", "mlp.up_proj.bias"]
        present = tuple(s.name for s in fam.slices if s.optional and s.name in names)
    return ArchInfo(
        family=fam.name,
        model_type=model_type,
        num_layers=int(_cfg(text_cfg, "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=int(_cfg(text_cfg, "vocab_size")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        present_optional=present,
    )


def decoder_param_count(model: Any, arch: ArchInfo) -> int:
    """Parameters of the decoder layers of a loaded model (norms included; embeddings and lm_head not)."""
    prefix = arch.fam.layer_prefix.split("{}")[0]
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
