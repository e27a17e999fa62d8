"""Loading a variant directory into a normal transformers model (no trust_remote_code, no pickles).

Uniform variants (and any plain HF directory) load with ``AutoModelForCausalLM.from_pretrained``.
Per-layer variants carry their widths in ``config.json["nestprune"]["layers"]``; loading them:

1. build the model from the (global) config on the meta device;
2. replace each layer's q/k/v/o and gate/up/down Linear modules by ones of the layer's width;
   GQA: if every kept KV head serves the same number of kept query heads, set the module's
   ``num_key_value_groups``; otherwise gather (duplicate) K/V rows per kept query head at load and use
   one group; a layer with no heads gets an ``EmptyAttention`` (o_proj's bias, or zeros);
3. ``load_state_dict(..., assign=True)`` from the safetensors files (tied lm_head = embeddings);
4. re-create the rotary embedding (its buffers are non-persistent and were left on meta).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nestprune.errors import NestpruneError
from nestprune.io.weights import weight_files
from nestprune.variant.widths import uniform_groups


class EmptyAttention(nn.Module):
    """Attention of a layer that kept no head: outputs o_proj(empty) = its bias or zeros.

    It keeps the (zero-width) projections and norms of the module it replaces, so the state dict keys
    stay those of the checkpoint, and it appends one all-zero K/V head per token to the cache so the
    cache length (which generate reads from layer 0) stays right.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.config = attn.config

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, seq = hidden_states.shape[:2]
        out = self.o_proj(hidden_states.new_zeros(batch, seq, 0))  # (batch, seq, hidden)
        if past_key_values is not None:
            dummy = hidden_states.new_zeros(batch, 1, seq, self.head_dim)  # (batch, 1 head, seq, head_dim)
            past_key_values.update(dummy, dummy, self.layer_idx)
        return out, None


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise NestpruneError(f"{path} has no config.json; is it a model directory?")
    return json.loads(cfg_file.read_text())


def is_per_layer(config: dict[str, Any]) -> bool:
    return (config.get("nestprune") or {}).get("layout") == "per-layer"


def linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    with warnings.catch_warnings():  # a zero-width layer is legitimate here
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta", dtype=old.weight.dtype)


def resize_layer_(layer: nn.Module, widths: dict[str, Any], head_dim: int) -> int | None:
    """Give one decoder layer its kept widths (on meta). Returns the K/V gather-map need: the number of
    kept query heads when K/V rows must be duplicated per query head, else None."""
    attn, mlp = layer.self_attn, layer.mlp
    h, k, c = widths["num_attention_heads"], widths["num_key_value_heads"], widths["intermediate_size"]
    hidden = attn.o_proj.out_features
    groups = uniform_groups(widths["kv_of_head"], k)
    kv_heads = k if (groups or h == 0) else h  # no common group count: one K/V head per kept query head
    attn.q_proj = linear_like(attn.q_proj, hidden, h * head_dim)
    attn.k_proj = linear_like(attn.k_proj, hidden, kv_heads * head_dim)
    attn.v_proj = linear_like(attn.v_proj, hidden, kv_heads * head_dim)
    attn.o_proj = linear_like(attn.o_proj, h * head_dim, hidden)
    if h == 0:
        layer.self_attn = EmptyAttention(attn)
    else:
        attn.num_key_value_groups = groups or 1
    mlp.gate_proj = linear_like(mlp.gate_proj, hidden, c)
    mlp.up_proj = linear_like(mlp.up_proj, hidden, c)
    mlp.down_proj = linear_like(mlp.down_proj, c, hidden)
    mlp.intermediate_size = c
    return None if kv_heads == k else h


def gather_kv(t: torch.Tensor, kv_of_head: list[int], head_dim: int) -> torch.Tensor:
    """K/V weight (k*d, hidden) or bias (k*d,) → one head per kept query head: (h*d, …)."""
    heads = t.view(-1, head_dim, *t.shape[1:])  # (k, d, …)
    return heads[torch.as_tensor(kv_of_head, dtype=torch.long)].reshape(-1, *t.shape[1:])


def read_state_dict(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        with safe_open(str(f), framework="pt", device=str(device)) as h:
            for name in h.keys():
                t = h.get_tensor(name)
                sd[name] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    return sd


def load_plain(path: Path, dtype: torch.dtype | None, device: str | torch.device,
               attn_implementation: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(device).eval()


def load_variant(path: Path | str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 attn_implementation: str | None = None) -> nn.Module:
    """Load a variant directory (or any HF causal-LM directory) into a transformers model in eval mode.

    ``dtype`` None keeps the stored dtype; ``attn_implementation`` ("eager", "sdpa", …) None = the default.
    """
    path = Path(path)
    raw = read_config(path)
    if not is_per_layer(raw):
        return load_plain(path, dtype, device, attn_implementation)
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(path))
    layers_cfg = raw["nestprune"]["layers"]
    if len(layers_cfg) != config.num_hidden_layers:
        raise NestpruneError(f"{path}/config.json lists {len(layers_cfg)} layer widths for "
                             f"{config.num_hidden_layers} layers")
    sd = read_state_dict(path, dtype, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    head_dim = model.model.layers[0].self_attn.head_dim
    loaded_widths = []  # what the model in memory holds (gathered K/V: one KV head per query head)
    for i, (layer, widths) in enumerate(zip(model.model.layers, layers_cfg, strict=True)):
        gathered = resize_layer_(layer, widths, head_dim)
        if gathered is not None:
            for part in ("k_proj", "v_proj"):
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.self_attn.{part}.{kind}"
                    if key in sd:
                        sd[key] = gather_kv(sd[key], widths["kv_of_head"], head_dim)
            widths = {**widths, "num_key_value_heads": gathered, "kv_of_head": list(range(gathered))}
        loaded_widths.append(widths)
    # so that save_pretrained of the loaded model writes a directory load_variant reads back
    model.config.nestprune = {**raw["nestprune"], "layers": loaded_widths}
    if raw.get("tie_word_embeddings") and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise NestpruneError(f"{path} does not match its config.json: {str(e).splitlines()[0]}") from None
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:
        raise NestpruneError(f"internal: {len(stray)} tensors left on the meta device after loading, e.g. {stray[0]}")
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()
