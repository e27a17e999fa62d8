"""Loading a variant directory into a normal transformers model (no trust_remote_code, no pickles).

Uniform variants (and any plain HF directory) load with ``AutoModelForCausalLM.from_pretrained``.
Per-layer variants carry their widths in ``config.json["nestprune"]["layers"]``; loading them:

1. build the model from the (global) config with its parameters on the meta device (buffers such as the
   rotary frequencies and Gemma's embedding scale are computed for real, from the config);
2. replace each layer's sliced Linear modules (the family table in arch.py: q/k/v/o and gate/up/down, or
   Phi-3's fused qkv_proj and gate_up_proj) by ones of the layer's width; GQA: if every kept KV head serves
   the same number of kept query heads, set the module's ``num_key_value_groups``; otherwise gather
   (duplicate) K/V rows per kept query head at load and use one group; a layer with no heads gets an
   ``EmptyAttention`` (o_proj's bias, or zeros); an attention that reads widths from the global config
   (Phi-3) gets its own view of the config;
3. ``load_state_dict(..., assign=True)`` from the safetensors files (tied lm_head = embeddings).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from nestprune.arch import ArchInfo, TensorSlice, arch_from_config, needs_eager_attention
from nestprune.errors import NestpruneError
from nestprune.io.fingerprint import read_config
from nestprune.io.weights import weight_files
from nestprune.variant.widths import expand, uniform_groups


class EmptyAttention(nn.Module):
    """Attention of a layer that kept no head: outputs o_proj(empty) = its bias or zeros.

    It keeps the (zero-width) projections and norms of the module it replaces, so the state dict keys
    stay those of the checkpoint, and it appends one all-zero K/V head per token to the cache so the
    cache length (which generate reads from layer 0) stays right.
    """

    def __init__(self, attn: nn.Module, output: str = "o_proj"):
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.config = attn.config
        self.output = output  # the output projection's name inside the attention module

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, seq = hidden_states.shape[:2]
        out = getattr(self, self.output)(hidden_states.new_zeros(batch, seq, 0))  # (batch, seq, hidden)
        if past_key_values is None:  # transformers >= 5.2x passes the cache as `cache`
            past_key_values = kwargs.get("cache")
        if past_key_values is not None:
            dummy = hidden_states.new_zeros(batch, 1, seq, self.head_dim)  # (batch, 1 head, seq, head_dim)
            past_key_values.update(dummy, dummy, self.layer_idx)
        return out, None


def is_per_layer(config: dict[str, Any]) -> bool:
    widths = config.get("nestprune")
    return isinstance(widths, dict) and widths.get("layout") == "per-layer"


def linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    with warnings.catch_warnings():  # a zero-width layer is legitimate here
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta", dtype=old.weight.dtype)


def resize_layer_(layer: nn.Module, widths: dict[str, Any], arch: ArchInfo) -> int | None:
    """Give one decoder layer its kept widths (on meta). Returns the K/V gather-map need: the number of
    kept query heads when K/V rows must be duplicated per query head, else None."""
    fam = arch.fam
    attn, mlp = layer.get_submodule(fam.attention), layer.get_submodule(fam.mlp)
    h, k, c = widths["num_attention_heads"], widths["num_key_value_heads"], widths["intermediate_size"]
    groups = uniform_groups(widths["kv_of_head"], k)
    kv_heads = k if (groups or h == 0) else h  # no common group count: one K/V head per kept query head
    counts = {"q": h, "kv": kv_heads, "mlp": c}
    for path, (out_features, in_features) in arch.linear_shapes(counts).items():
        parent, name = path.rsplit(".", 1)
        module = layer.get_submodule(parent)
        setattr(module, name, linear_like(getattr(module, name), in_features, out_features))
    if h == 0:
        output = fam.output_slice("q").module.removeprefix(fam.attention + ".")
        setattr(layer, fam.attention, EmptyAttention(attn, output))
    else:
        for module, name, value in ((attn, "num_key_value_groups", groups or 1), (attn, "num_key_value_heads", kv_heads)):
            if hasattr(module, name):
                setattr(module, name, value)
        view = arch.attention_config(counts)
        if any(getattr(attn.config, key) != value for key, value in view.items()):
            # this attention reads widths from the global config: a narrower layer gets its own view
            attn.config = copy.copy(attn.config)
            for key, value in view.items():
                setattr(attn.config, key, value)
    mlp.intermediate_size = c
    return None if kv_heads == k else h


def gather_kv_(sd: dict[str, torch.Tensor], arch: ArchInfo, layer: int, widths: dict[str, Any]) -> None:
    """Duplicate the K/V rows of one layer per kept query head (``kv_of_head``), in place in ``sd``: in
    k_proj/v_proj, or in the K and V segments of a fused tensor (Phi-3 qkv_proj)."""
    stored = {"q": widths["num_attention_heads"], "kv": widths["num_key_value_heads"],
              "mlp": widths["intermediate_size"]}
    kv_rows = expand(np.asarray(widths["kv_of_head"], dtype=np.int64), arch.head_dim)  # (h*d,)

    def rows(s: TensorSlice) -> np.ndarray:
        return kv_rows if s.space == "kv" else np.arange(arch.segment_length(s, stored))

    for name in arch.tensor_names():
        segments, key = arch.segments(name), arch.layer_key(layer, name)
        if key in sd and any(s.space == "kv" for s in segments):
            index = torch.as_tensor(arch.tensor_index(name, rows, stored))
            sd[key] = sd[key].index_select(segments[0].axis, index)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init cost) while their
    buffers (rotary frequencies, embedding scales: computed from the config) are real. It swaps
    ``nn.Module.register_parameter`` while it is open (as accelerate's ``init_empty_weights`` does), so no
    other thread should build modules meanwhile."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_state_dict(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        with safe_open(str(f), framework="pt", device=str(device)) as h:
            for name in h.keys():
                t = h.get_tensor(name)
                sd[name] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    return sd


WIDTH_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def check_layer_widths(layers: Any, num_layers: int, path: Path) -> list[dict[str, Any]]:
    """The per-layer widths of a variant's config.json, checked (one line if edited into nonsense)."""
    where = f"{path}/config.json"
    if not isinstance(layers, list) or len(layers) != num_layers:
        n = len(layers) if isinstance(layers, list) else "no"
        raise NestpruneError(f"{where} lists {n} layer widths for {num_layers} layers")
    for i, w in enumerate(layers):
        ok = isinstance(w, dict) and all(isinstance(w.get(k), int) and not isinstance(w.get(k), bool)
                                         and w[k] >= 0 for k in WIDTH_FIELDS)
        kv_of_head = w.get("kv_of_head") if isinstance(w, dict) else None
        ok = ok and isinstance(kv_of_head, list) and len(kv_of_head) == w["num_attention_heads"] and all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < max(w["num_key_value_heads"], 1)
            for k in kv_of_head)
        if not ok:
            raise NestpruneError(f"{where}: the widths of layer {i} are invalid (nestprune.layers[{i}] needs "
                                 f"{', '.join(WIDTH_FIELDS)} and kv_of_head)")
    return layers


def load_plain(path: Path, dtype: torch.dtype | None, device: str | torch.device,
               attn_implementation: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # use_safetensors: never fall back to a pickle (weight_files has refused directories holding only pickles)
    return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **kwargs).to(device).eval()


def load_variant(path: Path | str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 attn_implementation: str | None = None) -> nn.Module:
    """Load a variant directory (or any HF causal-LM directory) into a transformers model in eval mode.

    ``dtype`` None keeps the stored dtype; ``attn_implementation`` ("eager", "sdpa", …) None = the default
    (eager where the config soft-caps attention logits, which SDPA cannot).
    """
    path = Path(path)
    raw = read_config(path)
    weight_files(path)  # safetensors only: a directory of pickles (.bin/.pt) is refused with how to convert it
    if attn_implementation is None and needs_eager_attention(raw):
        attn_implementation = "eager"  # SDPA cannot soft-cap attention logits
    if not is_per_layer(raw):
        return load_plain(path, dtype, device, attn_implementation)
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(path))
    layers_cfg = check_layer_widths(raw["nestprune"].get("layers"), config.num_hidden_layers, path)
    sd = read_state_dict(path, dtype, device)
    arch = arch_from_config(raw, set(sd))
    with parameters_on_meta():
        # built under ``dtype`` as from_pretrained builds: buffers computed from the config (Gemma's embedding
        # scale) get that precision too, so an fp64 load is fp64 throughout
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 **({"dtype": dtype} if dtype is not None else {}))
    loaded_widths = []  # what the model in memory holds (gathered K/V: one KV head per query head)
    for i, (layer, widths) in enumerate(zip(model.get_submodule(arch.fam.layers_path), layers_cfg, strict=True)):
        gathered = resize_layer_(layer, widths, arch)
        if gathered is not None:
            gather_kv_(sd, arch, i, widths)
            widths = {**widths, "num_key_value_heads": gathered, "kv_of_head": list(range(gathered))}
        loaded_widths.append(widths)
    # so that save_pretrained of the loaded model writes a directory load_variant reads back
    model.config.nestprune = {**raw["nestprune"], "layers": loaded_widths}
    names = {m: n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_key = f"{names[head]}.weight"
    if arch.tie_word_embeddings and head_key not in sd:
        sd[head_key] = sd[f"{names[embed]}.weight"]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise NestpruneError(f"{path} does not match its config.json: {str(e).splitlines()[0]}") from None
    if arch.tie_word_embeddings:  # one parameter again (assign=True gave each module its own)
        head.weight = embed.weight
    model.to(device)  # the buffers were built on the CPU
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:
        raise NestpruneError(f"internal: {len(stray)} tensors left on the meta device after loading, e.g. {stray[0]}")
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()
