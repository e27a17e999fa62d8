"""The lean build: the chunked LM loss against the full-logits one, the accumulator modes, streamed
calibration against the in-memory windows, the memory plan in `nestprune build` (--plan, auto micro-batch,
stopping before the weights) and the early checks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CONFIGS, SAMPLE_TEXT, make_tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from nestprune.artifact import read_artifact
from nestprune.build import BuildConfig, build_artifact, plan_only
from nestprune.errors import NestpruneError
from nestprune.io.text import DOC_SEPARATOR, iter_documents, read_documents
from nestprune.objectives.base import ChunkedLinearNLL, token_nll, token_nll_from_logits
from nestprune.objectives.lm import LanguageModeling
from nestprune.rank.calibration import (
    CalibrationSet,
    load_calibration,
    sample_windows,
    stream_windows,
    tokenize_documents,
)
from nestprune.rank.gisp import accumulate_gradients
from nestprune.rank.memory import (
    install_accumulators,
    remove_accumulators,
    stochastic_add_,
    stochastic_round_,
)

# ---------------------------------------------------------------------------------------------
# the LM loss without full-vocabulary logits


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_chunked_loss_equals_the_full_logits_loss(family):
    """Per-sample losses equal to the bit (classes laid out as the plain path's cross-entropy lays them out);
    gradients equal to fp32 rounding; soft-capped logits (Gemma) and ignored labels included."""
    model = make_tiny_model(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 20))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[2, 11] = -100
    params = [p for n, p in model.named_parameters() if ".layers.1." in n and n.endswith("weight")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    weights = torch.tensor([0.5, -1.0, 2.0])  # any per-sample combination (margin objectives subtract)
    got = token_nll(model, ids, labels)
    (got * weights).sum().backward()
    g_got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    want = token_nll_from_logits(model, ids, labels)
    (want * weights).sum().backward()
    assert torch.equal(got, want)
    for a, p in zip(g_got, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5 * float(p.grad.abs().max()))


def test_chunked_loss_in_many_chunks_and_without_a_vocabulary_sized_copy():
    torch.manual_seed(0)
    B, T, d, V = 2, 9, 16, 50
    hidden = torch.randn(B, T, d, requires_grad=True)
    weight = torch.randn(V, d)
    labels = torch.randint(0, V, (B, T))
    labels[1, :3] = -100
    one = ChunkedLinearNLL.apply(hidden, weight, None, labels, None, 1 << 30)  # one chunk
    many = ChunkedLinearNLL.apply(hidden, weight, None, labels, 0.0, 4 * V * 4)  # chunks of 4 tokens
    assert torch.equal(one, many)
    g1, = torch.autograd.grad(one.sum(), hidden)
    g2, = torch.autograd.grad((many * 2).sum(), hidden)
    torch.testing.assert_close(g2, 2 * g1)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(one, ref.sum(1) / (labels != -100).sum(1))
    with pytest.raises(NotImplementedError):  # the output layer's gradient is never computed
        ChunkedLinearNLL.apply(hidden, weight.requires_grad_(True), None, labels)


# ---------------------------------------------------------------------------------------------
# accumulators


def test_stochastic_rounding_is_unbiased_and_on_the_bf16_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 1 / 512)  # between two bf16 neighbours (1 and 1 + 1/128), 1/4 of the way
    r = stochastic_round_(x.clone(), g)
    assert torch.equal(r.to(torch.bfloat16).float(), r)  # exactly representable
    assert set(r.unique().tolist()) == {1.0, 1.0 + 1 / 128}
    assert r.mean().item() == pytest.approx(1.0 + 1 / 512, abs=2e-5)
    neg = stochastic_round_(-x.clone(), g)
    assert neg.mean().item() == pytest.approx(-(1.0 + 1 / 512), abs=2e-5)
    # summing many small gradients into bf16: stochastic rounding stays unbiased, round-to-nearest stalls
    buf, nearest = torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(1000, dtype=torch.bfloat16)
    step = torch.full((1000,), 1e-3)
    for _ in range(2000):
        stochastic_add_(buf, step, g, chunk=300)
        nearest += step.to(torch.bfloat16)
    assert buf.float().mean().item() == pytest.approx(2.0, rel=0.01)
    assert nearest.float().mean().item() < 1.0


def test_accumulator_modes_agree_with_fp32_and_buffers_persist(tokenizer):
    model = make_tiny_model("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)
    stream = tokenize_documents(SAMPLE_TEXT.split("\n\n"), tokenizer)
    calib = CalibrationSet(windows=sample_windows(stream, 4, 16, 0), source="m", sha256="0" * 64, seed=0,
                           documents=1, tokens_available=len(stream))
    named = dict(model.named_parameters())
    params = {n: named[n] for n in ("model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight")}
    got = {}
    for mode in ("fp32", "bf16-stochastic", "fp32-host"):
        buffers: dict = {}
        loss, grads = accumulate_gradients(model, LanguageModeling(calib), params, 1, accumulator=mode,
                                           buffers=buffers, generator=torch.Generator().manual_seed(0))
        kept = {n: b for n, b in buffers.items()}
        again, _ = accumulate_gradients(model, LanguageModeling(calib), params, 1, accumulator=mode,
                                        buffers=buffers, generator=torch.Generator().manual_seed(0))
        assert loss == again and all(buffers[n] is kept[n] for n in kept)  # allocated once, zeroed, refilled
        got[mode] = {n: g.float().clone() for n, g in grads.items()}
        assert all(g.dtype == (torch.bfloat16 if mode == "bf16-stochastic" else torch.float32) for g in grads.values())
        assert not any(p.requires_grad or p.grad is not None for p in params.values())
    for n in params:
        assert torch.equal(got["fp32-host"][n], got["fp32"][n])  # the same fp32 sums, kept elsewhere
        scale = got["fp32"][n].abs().max()
        assert (got["bf16-stochastic"][n] - got["fp32"][n]).abs().max() <= 0.02 * scale


def test_fp32_weights_accumulate_in_a_persistent_grad():
    w = torch.nn.Parameter(torch.ones(3, 2))
    buffers, hooks = install_accumulators({"w": w}, "fp32")
    buf = buffers["w"]
    assert w.grad is buf
    for _ in range(3):
        (w * 2).sum().backward()
    assert w.grad is buf and torch.equal(buf, torch.full((3, 2), 6.0))
    remove_accumulators({"w": w}, hooks)
    assert w.grad is None and not w.requires_grad and torch.equal(buffers["w"], buf)
    buffers2, _ = install_accumulators({"w": w}, "fp32", buffers=buffers)
    assert buffers2["w"] is buf and not buf.any()  # reused, zeroed


# ---------------------------------------------------------------------------------------------
# streamed calibration


@pytest.mark.parametrize("docs_per_batch,chars_per_batch,sizes", [
    (256, 1 << 18, [3]), (2, 1 << 18, [2, 1]), (256, 5, [2, 1]), (3, 1, [1, 1, 1])])
def test_streamed_windows_are_the_in_memory_windows(tokenizer, tmp_path, monkeypatch, docs_per_batch,
                                                    chars_per_batch, sizes):
    """Whatever the tokeniser's batches (by documents, by characters, one document each)."""
    import nestprune.rank.calibration as cal

    monkeypatch.setattr(cal, "DOCS_PER_BATCH", docs_per_batch)
    monkeypatch.setattr(cal, "CHARS_PER_BATCH", chars_per_batch)
    docs = [f"document {i} " + " ".join(SAMPLE_TEXT.split()[i : i + 3 + (i * 7) % 40]) for i in range(90)]
    assert [len(b) for b in cal._batches(iter(["ab", "cde", "f"]))] == sizes
    path = tmp_path / "c.txt"
    path.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n")
    stream = tokenize_documents(read_documents(path), tokenizer)
    for n, seq_len, seed in [(5, 16, 0), (40, 7, 3), (3, len(stream), 1), (2, 2, 9)]:
        c = load_calibration(path, tokenizer, n, seq_len, seed)
        assert torch.equal(c.windows, sample_windows(stream, n, seq_len, seed))
        assert c.tokens_available == len(stream) and c.documents == len(docs)
    with pytest.raises(NestpruneError, match="fewer than one window"):
        load_calibration(path, tokenizer, 1, len(stream) + 1)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(NestpruneError, match="holds no text"):
        load_calibration(empty, tokenizer, 1, 4)
    calls = []

    def changing():
        calls.append(1)
        return iter(docs if len(calls) == 1 else [d + " more" for d in docs])

    with pytest.raises(NestpruneError, match="changed while it was read"):
        stream_windows(changing, tokenizer, 50, 8, 0)


def test_iter_documents_streams_what_read_documents_reads(tmp_path):
    blank = tmp_path / "b.txt"
    blank.write_text("a\n\n\nb\nc\n\n\n\n  \n\nd")
    sep = tmp_path / "s.txt"
    sep.write_text(f"x\n{DOC_SEPARATOR}\n\ny\n\nz\n  {DOC_SEPARATOR} \n")
    assert list(iter_documents(blank)) == ["a", "b\nc", "d"]
    assert list(iter_documents(sep)) == ["x", "y\n\nz"]
    jl = tmp_path / "j.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "  "}\n{"text": "two"}\n')
    assert list(iter_documents(jl)) == ["one", "two"]
    jl.write_text('{"text": "one"}\n{"nope": 1}\n')
    with pytest.raises(NestpruneError, match="record 2"):
        list(iter_documents(jl))


# ---------------------------------------------------------------------------------------------
# the plan in the build, and the early checks


def test_plan_from_config_alone_on_the_command_line(tiny_model_dir, tmp_path):
    from nestprune.cli.main import app

    model_dir = tiny_model_dir("llama-gqa")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())  # no weights, no tokenizer
    runner = CliRunner()
    res = runner.invoke(app, ["build", str(bare), "--plan", "--json", "--device-memory", "2GiB", "--samples", "64",
                              "--seq-len", "32", "--throughput", "1000", "--max-sparsity", "0.5"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["fits"] is True and d["micro_batch"] == 64 and d["accumulator"] == "fp32"  # bf16 planned: fp32 fits
    assert d["dtype"] == "bfloat16" and d["device_memory"] == 2 << 30 and isinstance(d["peak_bytes"], int)
    assert sum(d["breakdown"].values()) == d["peak_bytes"] and d["tokens_per_step"] == 64 * 32
    assert d["projected_seconds"] < d["projected_seconds_dense"] and d["throughput_source"] == "given"
    res = runner.invoke(app, ["build", str(bare), "--plan", "--device-memory", "1MiB"])
    assert res.exit_code == 1 and "does not fit: needs" in res.output
    res = runner.invoke(app, ["build", str(bare), "--json"])
    assert res.exit_code != 0 and "--json goes with --plan" in res.output
    res = runner.invoke(app, ["build", str(bare), "--plan", "--method", "magnitude"])
    assert res.exit_code != 0 and "computes no gradients" in res.output


def test_auto_micro_batch_and_a_plan_that_does_not_fit(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    import nestprune.build as build_mod

    model_dir = tiny_model_dir("llama")
    m, _ = read_artifact(build_artifact(model_dir, sample_text_file, tmp_path / "a",
                                        BuildConfig(samples=6, seq_len=16, steps=3)))
    assert m.schedule.batch_size == 6  # auto: the whole step in one micro-batch fits
    loaded = []
    monkeypatch.setattr(build_mod, "load_model", lambda *a: loaded.append(1))
    with pytest.raises(NestpruneError, match=r"does not fit: needs .* would fit"):
        build_artifact(model_dir, sample_text_file, tmp_path / "b",
                       BuildConfig(samples=6, seq_len=16, steps=3, device_memory="64KiB"))
    assert not loaded and not (tmp_path / "b").exists()


def test_no_compact_builds_the_same_artifact(tiny_model_dir, sample_text_file, tmp_path):
    model_dir = tiny_model_dir("qwen3")
    kw = dict(samples=4, seq_len=16, steps=4, batch_size=2, max_sparsity=0.6)
    _, r1 = read_artifact(build_artifact(model_dir, sample_text_file, tmp_path / "a", BuildConfig(**kw)))
    _, r2 = read_artifact(build_artifact(model_dir, sample_text_file, tmp_path / "b", BuildConfig(no_compact=True, **kw)))
    assert (r1.index == r2.index).all() and (r1.score == r2.score).all()
    assert BuildConfig(no_compact=True).compact is False and BuildConfig().compact is True
    assert BuildConfig(compact=False).compact is False and dataclasses.replace(BuildConfig(compact=False)).compact is False


@pytest.mark.parametrize("bad,match", [
    (dict(batch_size="many"), "--batch-size must be 'auto' or a positive integer"),
    (dict(batch_size=0), "--batch-size"),
    (dict(accumulator="fp8"), "--accumulator must be one of"),
    (dict(device_memory="lots"), "cannot read a memory size"),
])
def test_build_config_refuses_bad_engine_options(bad, match):
    with pytest.raises(NestpruneError, match=match):
        BuildConfig(**bad)
    assert BuildConfig(batch_size="4").batch_size == 4


def test_early_checks_come_before_any_compute(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    import nestprune.build as build_mod

    model_dir = tiny_model_dir("llama")
    monkeypatch.setattr(build_mod, "load_tokenizer", lambda *a: pytest.fail("got past the early checks"))
    cfg = BuildConfig(samples=4, seq_len=16, steps=2)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(NestpruneError, match="not a writable folder"):
            build_artifact(model_dir, sample_text_file, locked / "sub" / "out", cfg)
        locked.chmod(0o700)
    cfg_path = model_dir / "config.json"
    config = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(NestpruneError, match="not supported"):
        build_artifact(model_dir, sample_text_file, tmp_path / "out", cfg)
    cfg_path.write_text(json.dumps(config))
    monkeypatch.undo()
    monkeypatch.setattr(build_mod, "load_model", lambda *a: pytest.fail("loaded weights before the data check"))
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(NestpruneError, match="fewer than one window"):
        build_artifact(model_dir, short, tmp_path / "out", BuildConfig(samples=4, seq_len=64, steps=2))
    with pytest.raises(NestpruneError, match="does not exist"):
        build_artifact(model_dir, tmp_path / "missing.txt", tmp_path / "out", cfg)


def test_plan_only_reads_nothing_but_the_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)))
    p = plan_only(Path(tmp_path), BuildConfig(samples=8, seq_len=16, device="cpu", batch_size=3))
    assert p.fits and p.micro_batch == 3 and p.dtype == "float32" and p.steps == 16


def test_a_build_that_does_not_fit_is_one_line_before_the_weights(tiny_model_dir, sample_text_file, tmp_path,
                                                                   monkeypatch):
    """On the command line: one ``error:`` line (and nothing on stdout) saying what the step needs and what
    would fit, in readable units; status 2 (the settings do not fit); no weights loaded, nothing written."""
    from test_cli_errors import one_error_line

    import nestprune.build as build_mod
    from nestprune.cli.main import app

    monkeypatch.setattr(build_mod, "load_model", lambda *a: pytest.fail("loaded the weights"))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["build", str(tiny_model_dir("llama")), "--data", str(sample_text_file), "--out",
                                   str(out), "--samples", "6", "--seq-len", "16", "--steps", "3",
                                   "--device-memory", "64KiB"])
    line = one_error_line(res, 2)
    assert "does not fit: needs" in line and "KiB usable of 64.0 KiB" in line and "would fit" in line
    assert not out.exists() and not list(tmp_path.glob(".*out*"))


# ---------------------------------------------------------------------------------------------
# no host sync per micro-batch


class _CountHostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a device sync on a GPU)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.equal.default)

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


class _PositionsLM:
    """The LM loss on batches that bring their own position ids (as a packed-sequence objective would)."""

    name = "positions"

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def batches(self, batch_size: int):
        for i in range(0, len(self.windows), batch_size):
            ids = self.windows[i : i + batch_size]
            yield {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}

    def loss(self, model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.mean(1).sum() / len(self.windows)

    def provenance(self) -> dict:
        return {}


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3"])  # gemma3: two masks (sliding and full) per forward
def test_the_loss_is_read_once_per_step_not_per_micro_batch(family):
    """Host reads over a whole gradient pass: one (the summed loss), whatever the number of micro-batches;
    transformers' packed-sequence check is skipped only while the model makes the position ids."""
    from transformers import masking_utils

    model = make_tiny_model(family)
    windows = torch.randint(3, 300, (8, 12))
    calib = CalibrationSet(windows=windows, source="m", sha256="0" * 64, seed=0, documents=1,
                           tokens_available=windows.numel())
    named = dict(model.named_parameters())
    params = {n: p for n, p in named.items() if ".layers.1." in n and n.endswith("proj.weight")}
    original = masking_utils.find_packed_sequence_indices
    losses = []
    for micro in (8, 2, 1):
        with _CountHostReads() as count:
            loss, _ = accumulate_gradients(model, LanguageModeling(calib), params, micro)
        assert count.reads == 1, (micro, count.reads)
        losses.append(loss)
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)
    assert masking_utils.find_packed_sequence_indices is original  # put back
    # position ids from the batch: the check runs (a value read per forward), and gives the same loss
    reads = []
    for micro in (8, 2):
        with _CountHostReads() as count:
            loss, _ = accumulate_gradients(model, _PositionsLM(windows), params, micro)
        reads.append(count.reads)
        assert loss == pytest.approx(losses[0], rel=1e-5)
    assert reads[1] > reads[0] > 1
    assert masking_utils.find_packed_sequence_indices is original
