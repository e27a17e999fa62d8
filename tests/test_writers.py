"""A variant = kept widths × a writer: the two registries, and the worked examples of docs/ARCHITECTURE.md
("add a width policy", "add a writer") run end to end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_slicing import synthetic_ranking, tiny_arch
from test_variant import ranking_for, reference, write_variant

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.schemas.variant import VariantManifest
from nestprune.variant import widths, writers
from nestprune.variant.contents import plan_tensors, take
from nestprune.variant.load import load_variant
from nestprune.variant.widths import (
    PerLayer,
    Target,
    WidthPolicy,
    is_nested,
    keep_from_units,
    per_layer_keeps,
    plan_variant,
    plan_widths,
    register_width_policy,
)
from nestprune.variant.writers import Writer, register_writer

# --- worked example 1: a width policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelsOnly:
    """Keep every attention head; cut only MLP channels, as many per layer as the per-layer subnetwork keeps."""

    name: ClassVar[str] = "channels-only"
    multiple_of: int | None = None


def channels_only_keeps(ranking, target: Target, config: ChannelsOnly):
    every_unit = np.arange(ranking.structures.attention_units)
    return tuple(keep_from_units(ranking.structures, every_unit, k.channels)
                 for k in per_layer_keeps(ranking, target, PerLayer(config.multiple_of)))


@pytest.fixture
def channels_only():
    entry = register_width_policy(WidthPolicy(ChannelsOnly, channels_only_keeps, same_in_every_layer=False,
                                              help="every head kept, MLP channels cut per layer"))
    yield entry
    del widths.WIDTH_POLICIES[entry.name]


def test_a_new_width_policy_is_one_entry(channels_only, tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama-gqa")
    ranking = ranking_for(base, "query", seed=3, prunable_layers=[1, 2])
    specs = [plan_variant(ranking, s, "channels-only") for s in (0.1, 0.2, 0.3)]
    per_layer = plan_variant(ranking, 0.2)
    assert all(k.num_heads == 4 and k.num_kv_heads == 2 for s in specs for k in s.layers)
    assert [k.channels.tolist() for k in specs[1].layers] == [k.channels.tolist() for k in per_layer.layers]
    assert is_nested(specs[0], specs[1]) and is_nested(specs[1], specs[2])
    assert specs[1].layout == "channels-only" and not specs[1].same_in_every_layer
    assert specs[1].achieved_sparsity < per_layer.achieved_sparsity  # heads were not cut
    # written by the hf writer as a per-layer config, loaded by load_variant, exact
    spec = write_variant(base, ranking, tmp_path / "v", 0.2, "channels-only")
    manifest = VariantManifest.model_validate_json((tmp_path / "v" / "nestprune_variant.json").read_text())
    assert manifest.layout == "channels-only"
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        got = load_variant(tmp_path / "v")(input_ids=ids).logits
        want = reference(base, spec)(input_ids=ids).logits  # the base with what the spec drops zeroed
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_width_registry_errors(channels_only):
    r = synthetic_ranking(tiny_arch("llama"))
    with pytest.raises(ValueError, match="already registered"):
        register_width_policy(channels_only)
    with pytest.raises(NestpruneError, match="unknown layout 'diagonal' \\(use per-layer, uniform or channels-only\\)"):
        plan_variant(r, 0.1, "diagonal")
    with pytest.raises(NestpruneError, match="multiple-of"):
        PerLayer(multiple_of=0)
    @dataclass(frozen=True)
    class Impostor:  # names a policy whose config class it is not
        name: ClassVar[str] = "uniform"
        multiple_of: int | None = None

    with pytest.raises(NestpruneError, match="internal: .* is not a Uniform"):
        plan_widths(r, 0.1, Impostor())
    spec = plan_widths(r, 0.1, ChannelsOnly(multiple_of=8))
    assert spec.widths == ChannelsOnly(8) and spec.multiple_of == 8
    assert all(k.intermediate_size % 8 == 0 for k in spec.layers)


# --- worked example 2: a writer -------------------------------------------------------------------------------


def write_single_file(spec, source, aux_dir, out, manifest, *, shard_bytes, force, inputs, progress):
    """One .safetensors file with every kept tensor; the variant manifest in its metadata."""
    from safetensors.torch import save_file

    tensors = {p.name: take(source, p).contiguous() for p in plan_tensors(source, spec)}
    with atomic.output_file(out, force=force, inputs=inputs) as tmp:
        save_file(tensors, str(tmp), metadata={"nestprune": manifest.model_dump_json()})  # one key: a fixed order


@pytest.fixture
def single_file():
    entry = register_writer(Writer("safetensors-file", lambda: write_single_file, "one safetensors file"))
    yield entry
    del writers.WRITERS[entry.name]


def test_a_new_writer_is_one_entry(single_file, tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2")
    ranking = ranking_for(base, "query", seed=1, prunable_layers=[1, 2])
    write_variant(base, ranking, tmp_path / "hf", 0.3)
    write_variant(base, ranking, tmp_path / "v.safetensors", 0.3, format="safetensors-file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "qwen2-0", "v.safetensors"]
    got, want = load_file(str(tmp_path / "v.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as h:
        meta = VariantManifest.model_validate_json(h.metadata()["nestprune"])
    assert meta == VariantManifest.model_validate_json((tmp_path / "hf" / "nestprune_variant.json").read_text())
    # the same atomic rules as every output
    with pytest.raises(NestpruneError, match="already exists"):
        write_variant(base, ranking, tmp_path / "v.safetensors", 0.2, format="safetensors-file")
    write_variant(base, ranking, tmp_path / "v.safetensors", 0.2, format="safetensors-file", force=True)
    replaced = load_file(str(tmp_path / "v.safetensors"))  # sparsity 0.2 keeps more than 0.3 did
    assert len(replaced["model.layers.1.mlp.up_proj.weight"]) > len(got["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(NestpruneError, match="the input"):
        write_variant(base, ranking, base, 0.2, format="safetensors-file", force=True)


def test_writer_registry_errors(single_file):
    with pytest.raises(ValueError, match="already registered"):
        register_writer(single_file)
    with pytest.raises(NestpruneError, match="unknown format 'onnx' \\(use hf, gguf or safetensors-file\\)"):
        writers.writer("onnx")
    assert writers.writer("hf").loadable and not single_file.loadable and not writers.writer("gguf").loadable
    with pytest.raises(NestpruneError, match="--gguf-type does not apply to --format hf \\(it applies to --format gguf\\)"):
        writers.writer("hf").check_options({"gguf_type": "f16", "tokenizer_pre": None})
    assert writers.writer("hf").check_options({"gguf_type": None}) == {}
    assert writers.writer("gguf").check_options({"gguf_type": "f32", "tokenizer_pre": None}) == {"gguf_type": "f32"}


def test_listing_policies_and_formats_imports_no_torch():
    """The CLI builds --layout and --format from the registries at start-up; that must stay light."""
    import subprocess
    import sys

    code = ("import sys, nestprune.cli.main, nestprune.variant.writers as w, nestprune.variant.widths as p; "
            "assert list(w.WRITERS) and list(p.WIDTH_POLICIES); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
