"""Streaming safetensors in → one GGUF file out (llama.cpp / llama-server / LM Studio / Ollama).

``write_gguf`` takes what ``materialize_variant`` takes (a ``TensorSource``, a ``VariantSpec``, an aux
directory with the base ``config.json`` and tokenizer files, an output path, provenance) and writes the
variant as a GGUF file that llama.cpp runs as is:

* ``per-layer`` variants of Llama, Mistral and Qwen2 as arch ``deci`` (llama.cpp's architecture for
  NVIDIA's Nemotron-NAS models), whose INT32 arrays ``deci.attention.head_count``,
  ``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` give every layer its own widths;
* ``uniform`` variants as the family's own arch (``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``);
  llama.cpp's ``qwen2`` sizes q_proj/o_proj by hidden_size, so a Qwen2 variant that lost heads is written
  as arch ``llama`` (the same graph, biases included, with the llama rotary layout).

What llama.cpp needs that a variant does not give directly (all handled exactly, by ``plan_layer``):

* in every layer n_head_kv must divide n_head, query head i reading KV head i // (n_head / n_head_kv).
  Query heads are ordered by the KV head they read (o_proj columns follow), and each KV head is repeated
  so that every copy serves g query heads, g = gcd of the per-KV-head counts: exact, never refused;
* a layer with no heads has no attention tensors — except layer 0 (llama.cpp cannot load that) and a
  checkpoint with an o_proj bias (the layer must still add it): there it keeps one all-zero head, whose
  output o_proj(0) + bias is exactly what the variant computes;
* a layer with no MLP channel would make llama.cpp's deci graph skip the layer's residual sum (and so
  lose its attention output): it keeps one all-zero channel instead (silu(0)·0 = 0);
* llama-family rotary (``llama``/``deci``) pairs consecutive values of a head, transformers pairs the two
  halves: q_proj/k_proj rows (and biases) are permuted per head, as llama.cpp's own converter does.
  Qwen2/Qwen3 in their own arch use the halves ("neox") layout and are written unpermuted;
* the head size is written explicitly (``key_length``/``value_length``), never derived from layer 0.

Refused with one line: Qwen3 per-layer (llama.cpp's deci has no per-head q/k norms: use
``--layout uniform``), rotary scalings llama.cpp cannot take (only default, linear and llama3), a
tokenizer whose pre-tokenizer llama.cpp does not implement (see ``gguf_vocab``).

Tensors are read one at a time through the source, sliced, converted and appended, so memory peaks at
one tensor; 1-D tensors (norms, biases) are always F32, as llama.cpp's converter writes them. The file
is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nestprune.arch import ArchInfo
from nestprune.errors import NestpruneError
from nestprune.io.weights import TensorSource
from nestprune.ranking import Ranking
from nestprune.schemas.artifact import BaseFingerprint
from nestprune.schemas.variant import VariantManifest
from nestprune.variant.widths import LayerKeep, VariantSpec

GgufType = Literal["f32", "f16", "bf16"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16")
Progress = Callable[[str, int, int], None]  # (tensor name, bytes written so far, bytes in total)

# family -> (arch of a uniform variant, whether that arch wants the llama rotary row permutation)
UNIFORM_ARCH: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
}
# llama.cpp's qwen2 arch sizes q_proj/o_proj as hidden x hidden: narrower attention goes to arch llama
FULL_WIDTH_ATTENTION = ("qwen2",)
PER_LAYER_ARCH = "deci"  # llama-family rotary: permuted rows
PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2")

# checkpoint key inside a layer -> GGUF name inside a block, and the index space it is cut along
LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
ATTENTION_PARTS = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.",
                   "self_attn.q_norm.", "self_attn.k_norm.", "input_layernorm.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


# --- pure planning ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufLayer:
    """One GGUF block: original indices in GGUF order; -1 marks an all-zero head or channel."""

    heads: np.ndarray  # int64 (h,) query heads, grouped by the KV head they read
    kv_heads: np.ndarray  # int64 (k,) KV head of each GGUF KV head (repeats allowed); h % k == 0
    channels: np.ndarray  # int64 (c,) MLP channels

    @property
    def n_head(self) -> int:
        return len(self.heads)

    @property
    def n_head_kv(self) -> int:
        return len(self.kv_heads)

    @property
    def n_ff(self) -> int:
        return len(self.channels)


def plan_layer(keep: LayerKeep, first: bool, zero_head_needed: bool) -> GgufLayer:
    """What llama.cpp gets for one kept layer (module docstring). ``first``: layer 0 (must keep a head);
    ``zero_head_needed``: the checkpoint has an o_proj bias, which a headless layer must still add."""
    if keep.num_heads == 0:
        pad = first or zero_head_needed
        heads = np.full(1 if pad else 0, -1, np.int64)
        kv = heads.copy()
    else:
        order = np.argsort(keep.kv_of_head, kind="stable")  # query heads grouped by the KV head they read
        kv_pos = np.asarray(keep.kv_of_head)[order]
        used, counts = np.unique(kv_pos, return_counts=True)  # ascending kv positions, query heads of each
        g = math.gcd(*counts.tolist())
        heads = np.asarray(keep.heads, np.int64)[order]
        kv = np.repeat(np.asarray(keep.kv_heads, np.int64)[used], counts // g)
    channels = np.asarray(keep.channels, np.int64)
    if len(channels) == 0:
        channels = np.full(1, -1, np.int64)
    return GgufLayer(heads=heads, kv_heads=kv, channels=channels)


def expand_units(units: np.ndarray, width: int) -> np.ndarray:
    """[1, -1], width 2 -> [2, 3, -1, -1]: unit indices to element indices, -1 (zero units) kept."""
    units = np.asarray(units, np.int64)
    el = units[:, None] * width + np.arange(width)[None, :]
    return np.where(units[:, None] < 0, -1, el).reshape(-1)


def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order turning transformers' half-split rotary into llama.cpp's interleaved one, per head:
    new row 2i + j of a head is old row j * head_dim/2 + i. (n_heads * head_dim,)"""
    half = head_dim // 2
    within = (np.arange(2)[None, :] * half + np.arange(half)[:, None]).reshape(-1)  # (head_dim,)
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


@dataclass(frozen=True)
class TensorOut:
    """One GGUF tensor: checkpoint ``source`` restricted to ``index`` (GGUF order, -1 = zeros) on ``axis``."""

    name: str
    source: str
    axis: int
    index: np.ndarray | None  # None: whole tensor
    shape: tuple[int, ...]
    rope_heads: int  # >0: permute rows per head for llama rotary (q/k weights and biases)


@dataclass(frozen=True)
class GgufPlan:
    arch: str
    layers: tuple[GgufLayer, ...]
    tensors: tuple[TensorOut, ...]
    permute_rope: bool


def choose_arch(spec: VariantSpec) -> tuple[str, bool]:
    family = spec.arch.family
    if family not in UNIFORM_ARCH:  # whatever the layout (Phi-3's fused tensors, Gemma's norms and soft-capping)
        raise NestpruneError(f"GGUF export does not support the {family} family")
    if spec.layout == "uniform":
        return UNIFORM_ARCH[family]
    if family not in PER_LAYER_FAMILIES:
        if family == "qwen3":
            raise NestpruneError("llama.cpp's per-layer architecture (deci) has no per-head q/k norms, so a Qwen3 "
                                 "per-layer variant cannot be written as GGUF; use --layout uniform (arch qwen3)")
        raise NestpruneError(f"GGUF export of per-layer {family} variants is not supported; use --layout uniform")
    return PER_LAYER_ARCH, True


def plan_gguf(spec: VariantSpec, names: list[str], shapes: dict[str, tuple[int, ...]]) -> GgufPlan:
    """Every GGUF tensor of the variant, in llama.cpp's order, from the checkpoint's tensor names/shapes."""
    arch_name, permute = choose_arch(spec)
    arch = spec.arch
    has_o_bias = arch.layer_key(0, "self_attn.o_proj.bias") in shapes
    layers = tuple(plan_layer(k, i == 0, has_o_bias) for i, k in enumerate(spec.layers))
    if arch_name != PER_LAYER_ARCH:
        widths = {(g.n_head, g.n_head_kv, g.n_ff) for g in layers}
        if len(widths) != 1:
            raise NestpruneError(f"the variant's layers do not all have one width ({sorted(widths)}); "
                                 f"arch {arch_name} needs a uniform variant")
        if arch_name in FULL_WIDTH_ATTENTION and layers[0].n_head * arch.head_dim != arch.hidden_size:
            arch_name, permute = "llama", True  # same graph, with q/k/v biases, and any attention width
    prefix = arch.fam.layer_prefix
    per_layer: dict[int, dict[str, str]] = {i: {} for i in range(arch.num_layers)}
    globals_: dict[str, str] = {}
    for n in names:
        if n.endswith(IGNORED_SUFFIXES):
            continue
        if n in GLOBAL_TENSORS:
            globals_[n] = GLOBAL_TENSORS[n]
            continue
        head = prefix.split("{}")[0]
        rest = n[len(head):] if n.startswith(head) else None
        layer_s, _, key = (rest or "").partition(".")
        if rest is None or not layer_s.isdigit() or int(layer_s) >= arch.num_layers or key not in LAYER_TENSORS:
            raise NestpruneError(f"tensor {n} has no GGUF counterpart in llama.cpp's {arch_name} architecture")
        per_layer[int(layer_s)][key] = n
    for need in ("model.embed_tokens.weight", "model.norm.weight"):
        if need not in globals_:
            raise NestpruneError(f"the base weights lack {need}")
    d = arch.head_dim
    tensors: list[TensorOut] = [TensorOut("token_embd.weight", "model.embed_tokens.weight", 0, None,
                                          shapes["model.embed_tokens.weight"], 0)]
    for i, g in enumerate(layers):
        q_rows, kv_rows, ch = expand_units(g.heads, d), expand_units(g.kv_heads, d), g.channels
        cut: dict[str, tuple[int, np.ndarray | None, int]] = {  # key -> (axis, index, rope heads)
            "self_attn.q_proj.weight": (0, q_rows, g.n_head), "self_attn.q_proj.bias": (0, q_rows, g.n_head),
            "self_attn.k_proj.weight": (0, kv_rows, g.n_head_kv), "self_attn.k_proj.bias": (0, kv_rows, g.n_head_kv),
            "self_attn.v_proj.weight": (0, kv_rows, 0), "self_attn.v_proj.bias": (0, kv_rows, 0),
            "self_attn.o_proj.weight": (1, q_rows, 0),
            "mlp.gate_proj.weight": (0, ch, 0), "mlp.gate_proj.bias": (0, ch, 0),
            "mlp.up_proj.weight": (0, ch, 0), "mlp.up_proj.bias": (0, ch, 0),
            "mlp.down_proj.weight": (1, ch, 0),
        }
        for key in sorted(per_layer[i], key=lambda k: list(LAYER_TENSORS).index(k)):
            if g.n_head == 0 and key.startswith(ATTENTION_PARTS):
                continue  # a headless layer has no attention tensors (nor the attention norm) in llama.cpp
            src = per_layer[i][key]
            axis, index, heads = cut.get(key, (0, None, 0))
            shape = list(shapes[src])
            if index is not None:
                shape[axis] = len(index)
            tensors.append(TensorOut(f"blk.{i}.{LAYER_TENSORS[key]}", src, axis, index, tuple(shape),
                                     heads if permute else 0))
    tensors.append(TensorOut("output_norm.weight", "model.norm.weight", 0, None, shapes["model.norm.weight"], 0))
    head = "lm_head.weight" if "lm_head.weight" in globals_ else "model.embed_tokens.weight"  # tied: write a copy
    tensors.append(TensorOut("output.weight", head, 0, None, shapes[head], 0))
    return GgufPlan(arch=arch_name, layers=layers, tensors=tuple(tensors), permute_rope=permute)


# --- rotary -------------------------------------------------------------------------------------------------

def rope_settings(config: dict[str, Any], head_dim: int) -> tuple[float, dict[str, Any], np.ndarray | None]:
    """(rope_theta, scaling keys to write, llama3 frequency factors or None) from a config.json dict."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = {**legacy, **{k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}}
    if kind == "default":
        return theta, {}, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(scaling["factor"])}, None
    if kind == "llama3":
        return theta, {}, llama3_rope_factors(theta, head_dim, scaling, config)
    raise NestpruneError(f"rotary scaling {kind!r} is not supported by the GGUF export (default, linear, llama3)")


def llama3_rope_factors(theta: float, head_dim: int, s: dict[str, Any], config: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's per-frequency divisors (what llama.cpp reads from ``rope_freqs.weight``). (head_dim/2,)"""
    factor, low, high = float(s.get("factor", 8.0)), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192)))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))
    return out.astype(np.float32)


# --- bytes --------------------------------------------------------------------------------------------------

def read_tensor(source: TensorSource, t: TensorOut) -> torch.Tensor:
    """The GGUF tensor's values in the source dtype: sliced, zero-padded, rotary-permuted."""
    if t.index is None:
        out = source.take(t.source, 0, None)
    else:
        idx = t.index
        valid = idx >= 0
        uniq = np.unique(idx[valid])
        got = source.take(t.source, t.axis, torch.from_numpy(uniq)) if len(uniq) else None
        full = list(source.shape(t.source))
        full[t.axis] = len(idx)
        out = torch.zeros(full, dtype=source.dtype(t.source))
        if got is not None:
            pos = torch.from_numpy(np.searchsorted(uniq, idx[valid]))
            out.index_copy_(t.axis, torch.from_numpy(np.flatnonzero(valid)), got.index_select(t.axis, pos))
    if tuple(out.shape) != t.shape:
        raise NestpruneError(f"the tensor source returned {t.source} as {tuple(out.shape)}, expected {t.shape}")
    if t.rope_heads:
        out = out.index_select(0, torch.from_numpy(rope_permutation(t.rope_heads, t.shape[0] // t.rope_heads)))
    return out


def to_numpy(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(array to write, GGML type) — 1-D tensors always F32."""
    from gguf import GGMLQuantizationType as Q

    if t.dim() <= 1 or gguf_type == "f32":
        return t.to(torch.float32).contiguous().numpy(), Q.F32
    if gguf_type == "f16":
        return t.to(torch.float16).contiguous().numpy(), Q.F16
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), Q.BF16


def out_itemsize(shape: tuple[int, ...], gguf_type: str) -> int:
    return 4 if (len(shape) <= 1 or gguf_type == "f32") else 2


# --- the writer ---------------------------------------------------------------------------------------------

def write_gguf(
    spec: VariantSpec,
    source: TensorSource,
    aux_dir: Path,
    out_path: Path,
    *,
    gguf_type: GgufType = "f16",
    ranking: Ranking | None = None,
    base: BaseFingerprint | None = None,
    artifact_digest: str | None = None,
    requested_params: int | None = None,
    tokenizer_pre: str | None = None,
    name: str | None = None,
    force: bool = False,
    inputs: Iterable[Path] = (),
    progress: Progress | None = None,
) -> Path:
    """Write the variant ``spec`` of the model behind ``source`` as one GGUF file at ``out_path``.

    spec       ``plan_variant(ranking, sparsity, layout, multiple_of)``
    source     every base tensor, by checkpoint key (``SafetensorsSource(base_dir)`` or a registry's store)
    aux_dir    a directory holding the base ``config.json`` and its tokenizer files
    out_path   written atomically (``nestprune.io.atomic``); refused if it exists unless ``force``
    gguf_type  f32 | f16 | bf16 for matrices (1-D tensors are F32)
    ranking    when given, checked to be the one ``spec`` was planned from
    base, artifact_digest, requested_params   provenance, stored as the ``nestprune.variant`` JSON string
    tokenizer_pre  llama.cpp pre-tokenizer name, when it cannot be recognised from tokenizer.json
    progress   called after each tensor with (GGUF name, bytes written, bytes in total)
    """
    from nestprune.variant.contents import variant_manifest

    if ranking is not None and spec.structures != ranking.structures:
        raise NestpruneError("the variant spec was not planned from this ranking (architecture or GQA mode differs)")
    manifest = variant_manifest(spec, base, artifact_digest, requested_params)
    write(spec, source, aux_dir, out_path, manifest, force=force, inputs=inputs, progress=progress,
          gguf_type=gguf_type, tokenizer_pre=tokenizer_pre, name=name)
    return Path(out_path)


def write(spec: VariantSpec, source: TensorSource, aux_dir: Path, out: Path, manifest: VariantManifest, *,
          shard_bytes: int | None = None, force: bool = False, inputs: Iterable[Path] = (),
          progress: Progress | None = None, gguf_type: GgufType = "f16", tokenizer_pre: str | None = None,
          name: str | None = None) -> None:
    """The ``--format gguf`` writer (``nestprune.variant.writers``): one file, never sharded."""
    import gguf

    from nestprune.io import atomic
    from nestprune.variant.gguf_vocab import add_vocab, read_vocab

    if gguf_type not in GGUF_TYPES:
        raise NestpruneError(f"unknown GGUF type {gguf_type!r} (use {', '.join(GGUF_TYPES)})")
    aux_dir, out = Path(aux_dir), Path(out)
    if out.is_dir():
        raise NestpruneError(f"{out} is a directory; give a file name such as model.gguf")
    if not (aux_dir / "config.json").exists():
        raise NestpruneError(f"{aux_dir} has no config.json")
    atomic.check_out(out, force, inputs, directory=False)
    config = json.loads((aux_dir / "config.json").read_text())
    names = list(source.names())
    shapes = {n: tuple(source.shape(n)) for n in names}
    plan = plan_gguf(spec, names, shapes)  # before any write: refusals come first
    arch = spec.arch
    theta, scaling, rope_factors = rope_settings(config, arch.head_dim)
    vocab = read_vocab(aux_dir, arch.vocab_size, tokenizer_pre)

    w = gguf.GGUFWriter(None, plan.arch)
    default_name = Path(manifest.base.path).name if manifest.base is not None else aux_dir.name
    write_metadata(w, plan, arch, config, gguf_type, theta, scaling, name or default_name)
    w.add_string("nestprune.variant", json.dumps(manifest.model_dump(mode="json"), separators=(",", ":")))
    add_vocab(w, vocab)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}
    total = 0
    if rope_factors is not None:
        w.add_tensor_info("rope_freqs.weight", rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
        total += rope_factors.nbytes
    for t in plan.tensors:
        size = out_itemsize(t.shape, gguf_type)
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * size
        raw = gguf.GGMLQuantizationType.F32 if size == 4 else qtype[gguf_type]
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if size == 4 else np.float16), nbytes, raw_dtype=raw)
        total += nbytes
    with atomic.output_file(out, force=force, inputs=inputs) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            done = 0
            if rope_factors is not None:
                w.write_tensor_data(rope_factors)
                done += rope_factors.nbytes
            for t in plan.tensors:
                data, _ = to_numpy(read_tensor(source, t), gguf_type)
                w.write_tensor_data(data)
                done += data.nbytes
                if progress is not None:
                    progress(t.name, done, total)
        finally:
            w.close()


def write_metadata(w: Any, plan: GgufPlan, arch: ArchInfo, config: dict[str, Any], gguf_type: str, theta: float,
                   scaling: dict[str, Any], name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[gguf_type])
    w.add_block_count(arch.num_layers)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(arch.hidden_size)
    w.add_vocab_size(arch.vocab_size)
    if plan.arch == PER_LAYER_ARCH:
        w.add_head_count([int(g.n_head) for g in plan.layers])
        w.add_head_count_kv([int(g.n_head_kv) for g in plan.layers])
        w.add_feed_forward_length([int(g.n_ff) for g in plan.layers])
    else:
        first = plan.layers[0]
        w.add_head_count(int(first.n_head))
        w.add_head_count_kv(int(first.n_head_kv))
        w.add_feed_forward_length(int(first.n_ff))
    w.add_key_length(arch.head_dim)
    w.add_value_length(arch.head_dim)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_rope_freq_base(theta)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
