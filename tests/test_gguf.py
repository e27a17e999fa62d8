"""GGUF export: per-layer variants as llama.cpp's ``deci``, uniform ones as the family's arch, checked
against the real engine (llama-cpp-python, f32 KV cache, no flash attention) on fixed prompts."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT
from test_slicing import synthetic_ranking

from nestprune.arch import Structures, arch_from_config
from nestprune.errors import NestpruneError
from nestprune.io.weights import SafetensorsSource
from nestprune.variant.gguf import plan_layer, rope_permutation, write_gguf
from nestprune.variant.load import load_variant
from nestprune.variant.materialize import materialize_variant
from nestprune.variant.widths import keep_from_units, plan_variant

PROMPTS = ["the kernel maps each page3 of memory", "python reads the file9 in order and the process"]


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def open_llama(path: Path, n_ctx: int = 128):
    lc = llama_cpp()
    return lc.Llama(str(path), logits_all=True, type_k=0, type_v=0, flash_attn=False, n_ctx=n_ctx, n_batch=n_ctx,
                    n_threads=2, verbose=False, seed=0)


def gguf_logits(path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    llm = open_llama(path)
    try:
        out = []
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()


def hf_logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def field(path: Path, key: str):
    return gguf.GGUFReader(str(path)).fields[key].contents()


def exact_prefix_sparsity(ranking, n: int) -> float:
    """The sparsity whose shortest removal prefix is exactly the first ``n`` entries."""
    return float(ranking.cost[:n].sum()) / ranking.decoder_params


def build(tiny_model_dir, tmp_path, name, layout, mode="query", sparsity=0.5, first=(), seed=0, **overrides):
    base = tiny_model_dir(name, seed=seed, **overrides)
    cfg = json.loads((base / "config.json").read_text())
    with SafetensorsSource(base) as src:
        arch = arch_from_config(cfg, set(src.names()))
        ranking = synthetic_ranking(arch, mode, seed=seed, first=list(first))
        if first:
            sparsity = exact_prefix_sparsity(ranking, len(first))
        spec = plan_variant(ranking, sparsity, layout)
        var = tmp_path / f"{name}-{layout}-var"
        materialize_variant(src, ranking, spec, base, var)
    return base, var, spec, ranking


def tokenize(var: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(var))
    return [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def check_logits(base: Path, var: Path, spec, out: Path, gguf_type: str = "f32", rel: float = 1e-4) -> float:
    with SafetensorsSource(base) as src:
        write_gguf(spec, src, base, out, gguf_type=gguf_type)
    prompts = tokenize(var, PROMPTS)
    ref = hf_logits(load_variant(var), prompts)
    got = gguf_logits(out, prompts)
    scale = max(float(np.abs(r).max()) for r in ref)
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
    print(f"[gguf {out.name} {gguf_type}] max |logit diff| {diff:.3g}, logit scale {scale:.3g}")
    assert diff <= rel * scale, f"max |logit diff| {diff:.3g} > {rel} x logit scale {scale:.3g}"
    return diff


# --- against the engine -------------------------------------------------------------------------------------

CASES = [  # (family, layout, gqa mode, sparsity, expected arch)
    ("llama", "per-layer", "query", 0.5, "deci"),
    ("llama-gqa", "per-layer", "query", 0.4, "deci"),
    ("llama-gqa", "per-layer", "group", 0.5, "deci"),
    ("mistral", "per-layer", "query", 0.6, "deci"),
    ("qwen2", "per-layer", "query", 0.5, "deci"),
    ("llama", "uniform", "query", 0.4, "llama"),
    ("llama-gqa", "uniform", "query", 0.4, "llama"),
    ("mistral", "uniform", "group", 0.4, "llama"),
    ("qwen2", "uniform", "query", 0.0, "qwen2"),
    ("qwen2", "uniform", "query", 0.4, "llama"),  # llama.cpp's qwen2 needs full-width attention
    ("qwen3", "uniform", "query", 0.4, "qwen3"),
]


@pytest.mark.parametrize("name,layout,mode,sparsity,arch", CASES)
def test_gguf_logits_match_transformers(tiny_model_dir, tmp_path, name, layout, mode, sparsity, arch):
    llama_cpp()
    base, var, spec, _ = build(tiny_model_dir, tmp_path, name, layout, mode, sparsity)
    out = tmp_path / f"{name}-{layout}-{mode}-{sparsity}.gguf"
    check_logits(base, var, spec, out)
    assert field(out, "general.architecture") == arch
    if arch == "deci":
        heads = field(out, "deci.attention.head_count")
        kv = field(out, "deci.attention.head_count_kv")
        assert len(heads) == len(spec.layers)
        assert all(k > 0 and h % k == 0 for h, k in zip(heads, kv, strict=True) if h)
        assert field(out, "deci.attention.key_length") == spec.arch.head_dim
    assert field(out, "nestprune.variant")  # provenance travels with the file


def test_uneven_gqa_groups_are_made_exact(tiny_model_dir, tmp_path):
    """Query mode with 3 of 4 heads of one KV group kept and 1 of another: KV heads repeated, exactly."""
    llama_cpp()
    first = [(1, "head", 0), (1, "head", 5), (1, "head", 6)]  # layer 1 of an 8-head, 2-KV model keeps 1,2,3 | 4,7
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama-gqa", "per-layer", first=first,
                               num_attention_heads=8, hidden_size=64)
    assert spec.layers[1].kv_of_head.tolist() == [0, 0, 0, 1, 1]
    out = tmp_path / "v.gguf"
    check_logits(base, var, spec, out)
    assert field(out, "deci.attention.head_count")[1] == 5
    assert field(out, "deci.attention.head_count_kv")[1] == 5  # gcd(3, 2) = 1: one KV copy per query head


def test_emptied_layers_with_biases(tiny_model_dir, tmp_path):
    """Layer 0 without heads (llama.cpp cannot drop layer 0's attention), a layer without channels (deci
    would drop its attention output), a layer without either; o_proj/down_proj biases must still be added."""
    llama_cpp()
    heads, channels = 4, 48
    first = ([(0, "head", h) for h in range(heads)] + [(1, "channel", c) for c in range(channels)]
             + [(2, "head", h) for h in range(heads)] + [(2, "channel", c) for c in range(channels)])
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama", "per-layer", first=first,
                               attention_bias=True, mlp_bias=True)
    kept = [(k.num_heads, k.intermediate_size) for k in spec.layers]
    assert kept[0][0] == 0 and kept[1][1] == 0 and kept[2] == (0, 0) and kept[3] == (4, 48)
    out = tmp_path / "v.gguf"
    check_logits(base, var, spec, out)
    assert field(out, "deci.attention.head_count") == [1, 4, 1, 4]  # zero heads where a bias must be added
    assert field(out, "deci.feed_forward_length") == [48, 1, 1, 48]  # one all-zero channel


def test_headless_layer_without_bias_has_no_attention(tiny_model_dir, tmp_path):
    llama_cpp()
    first = [(2, "head", h) for h in range(4)]
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "mistral", "per-layer", first=first)
    out = tmp_path / "v.gguf"
    check_logits(base, var, spec, out)
    assert field(out, "deci.attention.head_count")[2] == 0
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert not any(n.startswith("blk.2.attn") for n in names)


def test_greedy_continuation_equals_transformers(tiny_model_dir, tmp_path):
    llama_cpp()
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama-gqa", "per-layer", sparsity=0.4, seed=3)
    out = tmp_path / "v.gguf"
    with SafetensorsSource(base) as src:
        write_gguf(spec, src, base, out, gguf_type="f32")
    (prompt,) = tokenize(var, [PROMPTS[0]])
    model = load_variant(var)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    hf_new = hf[0, len(prompt):].tolist()
    llm = open_llama(out)
    try:
        got = []
        for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            got.append(int(t))
            if len(got) == len(hf_new):
                break
    finally:
        llm.close()
    assert got == hf_new


@pytest.mark.parametrize("gguf_type,qtype", [("f16", "F16"), ("bf16", "BF16")])
def test_half_precision_files(tiny_model_dir, tmp_path, gguf_type, qtype):
    llama_cpp()
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama-gqa", "per-layer", sparsity=0.4)
    out = tmp_path / "v.gguf"
    check_logits(base, var, spec, out, gguf_type=gguf_type, rel=3e-2)  # weights rounded to 16 bits
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"


# --- tokenizers ---------------------------------------------------------------------------------------------

TEXTS = ["the kernel maps each page of memory", "  python reads\n\nthe file9 in order!", "café über 🙂 x"]


def test_byte_level_bpe_tokenizes_like_transformers(tiny_model_dir, tmp_path):
    lc = llama_cpp()
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama", "uniform", sparsity=0.2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(str(base))
    out = tmp_path / "v.gguf"
    with SafetensorsSource(base) as src:
        write_gguf(spec, src, base, out, gguf_type="f32")
    assert field(out, "tokenizer.ggml.model") == "gpt2"
    assert field(out, "tokenizer.ggml.pre") == "gpt-2"
    assert field(out, "tokenizer.chat_template") == tok.chat_template
    llm = lc.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for t in TEXTS + [SAMPLE_TEXT[:500]]:
            assert llm.tokenize(t.encode(), add_bos=False, special=False) == tok(t, add_special_tokens=False)["input_ids"]
        assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


def spm_tokenizer():
    """A SentencePiece-style (Llama-2 / Mistral) BPE with byte fallback, trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    raw.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    learned = json.loads(raw.to_str())["model"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = raw.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer(tmp_path):
    lc = llama_cpp()
    from conftest import make_tiny_model, save_tiny_model

    tok = spm_tokenizer()
    base = save_tiny_model(make_tiny_model("mistral", vocab_size=len(tok)), tok, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    with SafetensorsSource(base) as src:
        arch = arch_from_config(cfg, set(src.names()))
        spec = plan_variant(synthetic_ranking(arch), 0.3, "per-layer")
        out = tmp_path / "v.gguf"
        write_gguf(spec, src, base, out, gguf_type="f32")
    assert field(out, "tokenizer.ggml.model") == "llama"
    assert field(out, "tokenizer.ggml.add_bos_token") is True
    assert field(out, "tokenizer.ggml.add_space_prefix") is True
    llm = lc.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for t in TEXTS + [SAMPLE_TEXT[:500]]:
            assert llm.tokenize(t.encode(), add_bos=True, special=False) == tok(t)["input_ids"], t
    finally:
        llm.close()


# --- pure pieces and refusals (no llama.cpp needed) ---------------------------------------------------------

def test_plan_layer_repeats_kv_heads_by_gcd():
    arch = arch_from_config(dict(model_type="llama", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=300))
    keep = keep_from_units(Structures(arch, "query"), np.array([0, 1, 2, 3, 4, 6]), np.arange(5))
    g = plan_layer(keep, first=False, zero_head_needed=False)
    assert g.heads.tolist() == [0, 1, 2, 3, 4, 6] and g.kv_heads.tolist() == [0, 0, 1]  # gcd(4, 2) = 2
    keep = keep_from_units(Structures(arch, "query"), np.array([], np.int64), np.array([], np.int64))
    assert plan_layer(keep, first=False, zero_head_needed=False).n_head == 0
    g = plan_layer(keep, first=True, zero_head_needed=False)
    assert g.heads.tolist() == [-1] and g.kv_heads.tolist() == [-1] and g.channels.tolist() == [-1]


def test_rope_permutation_interleaves_halves():
    assert rope_permutation(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_qwen3_per_layer_is_refused_in_one_line(tiny_model_dir, tmp_path):
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "qwen3", "per-layer", sparsity=0.3)
    with SafetensorsSource(base) as src, pytest.raises(NestpruneError, match="--layout uniform") as e:
        write_gguf(spec, src, base, tmp_path / "v.gguf")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf*"))


def test_existing_output_and_unknown_type_are_refused(tiny_model_dir, tmp_path):
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama", "per-layer", sparsity=0.3)
    out = tmp_path / "v.gguf"
    out.write_text("keep me")
    with SafetensorsSource(base) as src:
        with pytest.raises(NestpruneError, match="already exists"):
            write_gguf(spec, src, base, out)
        with pytest.raises(NestpruneError, match="unknown GGUF type"):
            write_gguf(spec, src, base, tmp_path / "w.gguf", gguf_type="q4")  # type: ignore[arg-type]
    assert out.read_text() == "keep me"


def test_unknown_pre_tokenizer_is_refused(tiny_model_dir, tmp_path):
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama", "per-layer", sparsity=0.3)
    tj = json.loads((base / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (base / "tokenizer.json").write_text(json.dumps(tj))
    with SafetensorsSource(base) as src:
        with pytest.raises(NestpruneError, match="--tokenizer-pre"):
            write_gguf(spec, src, base, tmp_path / "v.gguf")
        write_gguf(spec, src, base, tmp_path / "v.gguf", tokenizer_pre="gpt-2")  # named explicitly: written
    assert field(tmp_path / "v.gguf", "tokenizer.ggml.pre") == "gpt-2"


class FailingSource:
    """Delegates to a real source, fails on the n-th read: nothing may be left behind."""

    def __init__(self, src, fail_at: int):
        self.src, self.left = src, fail_at

    def names(self):
        return self.src.names()

    def shape(self, name):
        return self.src.shape(name)

    def dtype(self, name):
        return self.src.dtype(name)

    def take(self, name, axis=0, index=None):
        self.left -= 1
        if self.left < 0:
            raise NestpruneError("the store went away")
        return self.src.take(name, axis, index)


def test_failure_midway_leaves_nothing(tiny_model_dir, tmp_path):
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama", "per-layer", sparsity=0.3)
    out = tmp_path / "out" / "v.gguf"
    with SafetensorsSource(base) as src, pytest.raises(NestpruneError, match="went away"):
        write_gguf(spec, FailingSource(src, 5), base, out)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
])
def test_rotary_scalings(tiny_model_dir, tmp_path, rope):
    """Llama 3.1's frequency factors (rope_freqs.weight) and linear scaling reach llama.cpp exactly."""
    llama_cpp()
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama-gqa", "per-layer", sparsity=0.3,
                               rope_parameters=rope, head_dim=16, num_attention_heads=4, hidden_size=64)
    out = tmp_path / "v.gguf"
    check_logits(base, var, spec, out)
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert ("rope_freqs.weight" in names) == (rope["rope_type"] == "llama3")


def test_unsupported_rotary_scaling_is_refused(tiny_model_dir, tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    base, var, spec, _ = build(tiny_model_dir, tmp_path, "llama", "per-layer", sparsity=0.3, rope_parameters=rope)
    with SafetensorsSource(base) as src, pytest.raises(NestpruneError, match="rotary scaling 'yarn'"):
        write_gguf(spec, src, base, tmp_path / "v.gguf")


def test_materialize_and_pull_write_gguf_through_the_cli(tiny_model_dir, tmp_path, sample_text_file):
    """`materialize --format gguf` = the library writer; `pull --format gguf` writes the same bytes; the writer's
    options are refused for other formats."""
    llama_cpp()
    from typer.testing import CliRunner

    from nestprune.cli.main import app

    run = CliRunner().invoke
    base = tiny_model_dir("llama-gqa")
    art = tmp_path / "a.nestprune"
    r = run(app, ["build", str(base), "--data", str(sample_text_file), "--out", str(art), "--samples", "4",
                  "--seq-len", "16", "--steps", "4", "--max-sparsity", "0.5"])
    assert r.exit_code == 0, r.output
    gg, hf = tmp_path / "v.gguf", tmp_path / "v-hf"
    r = run(app, ["materialize", str(art), "--base", str(base), "--out", str(gg), "--sparsity", "0.3",
                  "--format", "gguf", "--gguf-type", "f32"])
    assert r.exit_code == 0, r.output
    r = run(app, ["materialize", str(art), "--base", str(base), "--out", str(hf), "--sparsity", "0.3"])
    assert r.exit_code == 0, r.output
    prompts = tokenize(hf, ["the kernel maps each page", "python reads the file in order"])
    want = hf_logits(load_variant(hf, dtype=torch.float32), prompts)
    got = gguf_logits(gg, prompts)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())

    reg = tmp_path / "reg"
    r = run(app, ["push", str(art), "--base", str(base), str(reg), "--name", "tiny"])
    assert r.exit_code == 0, r.output
    pulled = tmp_path / "p.gguf"
    r = run(app, ["pull", f"{reg}/tiny:latest", "--out", str(pulled), "--sparsity", "0.3", "--format", "gguf",
                  "--gguf-type", "f32"])
    assert r.exit_code == 0, r.output
    assert pulled.read_bytes() == gg.read_bytes()

    r = run(app, ["materialize", str(art), "--base", str(base), "--out", str(tmp_path / "x"), "--sparsity", "0.3",
                  "--gguf-type", "f16"])
    assert r.exit_code != 0 and "--gguf-type does not apply to --format hf" in r.output
    assert not (tmp_path / "x").exists()
    r = run(app, ["materialize", str(art), "--base", str(base), "--out", str(tmp_path / "y.gguf"), "--sparsity",
                  "0.3", "--format", "gguf", "--verify"])
    assert r.exit_code != 0 and "--verify" in r.output
