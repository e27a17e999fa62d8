"""Evaluation: perplexity by hand, multiple choice on a constructed model, greedy decoding, extraction, CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_model

from nestprune.errors import NestpruneError
from nestprune.evaluate import metrics as ev


@pytest.fixture(scope="module")
def tok():
    from nestprune.evaluate.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([SAMPLE_TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def llama(tok):
    return make_tiny_model("llama", num_layers=2, vocab_size=len(tok))


# --------------------------------------------------------------------------------------- perplexity


def test_perplexity_equals_hand_computation(llama, tok):
    docs = SAMPLE_TEXT.split("\n\n")[:6]
    stream = tok("\n\n".join(docs))["input_ids"]
    seq = 16
    n = len(stream) // seq
    assert len(stream) % seq != 0  # the partial tail is dropped
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):  # one window at a time, one position at a time
            ids = torch.tensor(stream[w * seq : (w + 1) * seq])[None]
            logp = torch.log_softmax(llama(input_ids=ids).logits[0].double(), -1)
            for pos in range(seq - 1):
                total -= float(logp[pos, ids[0, pos + 1]])
                count += 1
    r = ev.perplexity(llama, tok, docs, seq_len=seq, batch_size=3)
    assert (r.windows, r.tokens, r.seq_len) == (n, count, seq)
    assert r.nll == pytest.approx(total / count, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 50 < r.ppl < 2000  # a random 300-token model: near-uniform, but not exactly


def test_perplexity_file_reads_xz_and_jsonl(llama, tok, tmp_path):
    import lzma

    docs = SAMPLE_TEXT.split("\n\n")[:6]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
        f.write("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ppls = {p: ev.perplexity_file(llama, tok, tmp_path / p, seq_len=16).ppl for p in ("a.txt", "a.txt.xz", "a.jsonl")}
    assert len({round(v, 6) for v in ppls.values()}) == 1


def test_perplexity_refuses_too_little_text(llama, tok):
    with pytest.raises(NestpruneError, match="fewer than one window"):
        ev.perplexity(llama, tok, ["kernel"], seq_len=128)
    with pytest.raises(NestpruneError, match="at least 2"):
        ev.perplexity(llama, tok, ["kernel"], seq_len=1)


# --------------------------------------------------------------------------------------- multiple choice


class BigramLM(torch.nn.Module):
    """A hand-set bigram model: logits at position t depend only on token t (so log-likelihoods are exact)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # (V, V) next-token logits

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_multiple_choice_on_a_constructed_model():
    from nestprune.evaluate.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["kernel maps page python reads. " * 40], vocab_size=300)  # whole words
    V = len(tok)
    logp = torch.full((V, V), -8.0)
    ids = {w: tok(w, add_special_tokens=False)["input_ids"] for w in ("kernel", " maps", " page", " python", " reads")}
    assert all(len(v) == 1 for v in ids.values()), ids
    k, maps, page, py, reads = (ids[w][0] for w in ("kernel", " maps", " page", " python", " reads"))
    logp[k, maps] = -0.1  # "kernel maps" is likely
    logp[k, page] = -3.0
    logp[k, py] = -2.0
    logp[py, reads] = -0.2  # "kernel python reads" ≈ -2.3: above "page", below "maps"
    model = BigramLM(logp)
    items = [
        ev.ChoiceItem("kernel", ("page", "maps"), 1),
        ev.ChoiceItem("kernel", ("page", "python reads"), 1),
        ev.ChoiceItem("kernel", ("python reads", "maps", "page"), 1),
    ]
    r = ev.multiple_choice(model, tok, items, batch_size=2)
    assert r.predictions == (1, 1, 1)
    assert (r.acc, r.acc_norm) == (1.0, 1.0)
    # a case where the per-character normalisation changes the pick
    lp2 = logp.clone()
    lp2[k, maps] = -0.6  # "maps" ≈ -0.66 in total (-0.17 per character)
    lp2[k, py] = -1.0
    lp2[py, reads] = -0.2  # "python reads" ≈ -1.18 in total (-0.10 per character)
    m2 = BigramLM(lp2)
    scores = ev.continuation_logprobs(m2, [([k], [maps]), ([k], [py, reads])])
    lsm = torch.log_softmax(lp2, -1)
    assert scores[0] == pytest.approx(float(lsm[k, maps]), abs=1e-6)
    assert scores[1] == pytest.approx(float(lsm[k, py] + lsm[py, reads]), abs=1e-6)
    r2 = ev.multiple_choice(m2, tok, [ev.ChoiceItem("kernel", ("maps", "python reads"), 0)])
    expect_acc = int(scores[1] > scores[0])
    expect_norm = int(scores[1] / len("python reads") > scores[0] / len("maps"))
    assert (r2.predictions[0], r2.predictions_norm[0]) == (expect_acc, expect_norm)
    assert (expect_acc, expect_norm) == (0, 1)  # the constructed case separates the two metrics


def test_multiple_choice_batched_equals_single_on_a_real_model(llama, tok):
    items = [ev.ChoiceItem("the kernel maps each", ("page", "python reads the file", "of"), 0),
             ev.ChoiceItem("python reads", ("the file in order", "memory"), 1)]
    reqs = ev.encode_pairs(tok, [ev.join_choice(it.prompt, c, " ") for it in items for c in it.choices])
    batched = ev.continuation_logprobs(llama, reqs, batch_size=5)
    single = [ev.continuation_logprobs(llama, [q], batch_size=1)[0] for q in reqs]
    assert batched == pytest.approx(single, abs=1e-4)
    # and by hand for one request
    ctx, cont = reqs[1]
    with torch.no_grad():
        lsm = torch.log_softmax(llama(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
    hand = sum(float(lsm[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert single[1] == pytest.approx(hand, abs=1e-4)


def test_join_moves_spaces_like_lm_eval():
    assert ev.join_choice("Question: x\nAnswer:", "yes", " ") == ("Question: x\nAnswer:", " yes")
    assert ev.join_choice("Answer: ", "yes", " ") == ("Answer:", " yes")
    assert ev.join_choice("Answer:", " yes", " ") == ("Answer:", " yes")


def test_choice_items_are_validated(tmp_path):
    with pytest.raises(NestpruneError, match="record 1.*'answer'"):
        ev.parse_choice_items([{"prompt": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(NestpruneError, match="record 2.*choices"):
        ev.parse_choice_items([{"prompt": "q", "choices": ["a", "b"], "answer": 0},
                               {"prompt": "q", "choices": ["a"], "answer": 0}])
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "q", "choices": ["a", "b"], "answer": 0}\nnot json\n')
    with pytest.raises(NestpruneError, match=r"bad.jsonl:2: not valid JSON"):
        ev.multiple_choice_file(None, None, p)


# --------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("spec,text,expect", [
    ("first-line", "  42 apples\nmore text", "42 apples"),
    ("full", " a\nb ", "a\nb"),
    ("last-number", "3 boxes of 4 is 1,200.50 total.", "1200.5"),
    ("last-number", "no digits here", ""),
    ("regex:answer is (\\w+)", "I think the answer is blue, really", "blue"),
    ("regex:\\d+", "x 17 y 3", "17"),
    ("regex:(z+)", "nothing", ""),
])
def test_extraction_rules(spec, text, expect):
    assert ev.Extractor(spec)(text) == expect


def test_extraction_reference_and_errors():
    assert ev.Extractor("last-number").reference("#### 1,200") == "1200"
    assert ev.Extractor("first-line").reference(" Paris ") == "Paris"
    with pytest.raises(NestpruneError, match="bad regular expression"):
        ev.Extractor("regex:(unclosed")
    with pytest.raises(NestpruneError, match="--extract must be"):
        ev.Extractor("last-word")


def _manual_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_greedy_generation_matches_manual_decoding_in_batches(llama, tok):
    prompts = ["the kernel maps each page", "python", "reads the file in order and the kernel"]
    got = ev.greedy_generate(llama, tok, prompts, max_new_tokens=6, batch_size=3)
    eos = tok.eos_token_id
    for p, g in zip(prompts, got, strict=True):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        new = _manual_greedy(llama, ids, 6)[len(ids):]
        if eos in new:
            new = new[: new.index(eos)]
        assert g == tok.decode(new, skip_special_tokens=True)
    assert any(g.strip() for g in got)


def test_exact_match_counts_extracted_answers(llama, tok):
    prompts = ["the kernel maps each page", "python", "reads the file"]
    completions = ev.greedy_generate(llama, tok, prompts, max_new_tokens=4)
    first = ev.Extractor("first-line")(completions[0])
    assert first
    items = [ev.GenerationItem(prompts[0], first), ev.GenerationItem(prompts[1], "definitely not this"),
             ev.GenerationItem(prompts[2], "")]
    r = ev.exact_match(llama, tok, items, extract="first-line", max_new_tokens=4, batch_size=2)
    assert r.exact_match == pytest.approx(1 / 3)
    assert r.completions == tuple(completions)


# --------------------------------------------------------------------------------------- CLI


def test_cli_eval_json_and_table(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from nestprune.cli.main import app

    model_dir = tiny_model_dir("llama", num_layers=2)
    text = tmp_path / "valid.txt"
    text.write_text("\n\n".join(SAMPLE_TEXT.split("\n\n")[:8]))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "the kernel", "choices": ["maps", "python"], "answer": 0},
        {"prompt": "python", "choices": ["reads", "page"], "answer": 0}]))
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "the kernel maps", "answer": "7"}) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(model_dir), "--ppl", str(text), "--mc", str(mc), "--gen", str(gen),
                              "--seq-len", "32", "--json", "--device", "cpu", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    tasks = {r["task"]: r for r in doc["results"]}
    assert set(tasks) == {"perplexity", "multiple_choice", "exact_match"}
    # the CLI's number is the library's number on the same model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    lib = ev.perplexity_file(m, AutoTokenizer.from_pretrained(str(model_dir)), text, seq_len=32)
    assert tasks["perplexity"]["ppl"] == pytest.approx(lib.ppl, rel=1e-5)
    assert tasks["perplexity"]["tokens"] == lib.tokens
    assert tasks["multiple_choice"]["items"] == 2 and 0 <= tasks["multiple_choice"]["acc"] <= 1
    res = runner.invoke(app, ["eval", str(model_dir), "--ppl", str(text), "--seq-len", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and f"{lib.ppl:.3f}" in res.stdout


def test_cli_eval_errors_are_one_line(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from nestprune.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path), "--ppl", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "nothing to evaluate" in res.output
    (tmp_path / "t.txt").write_text("x")
    res = runner.invoke(app, ["eval", str(tmp_path), "--ppl", str(tmp_path / "t.txt")])
    assert res.exit_code == 2 and "not a model directory" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path), "--gen", str(tmp_path / "t.txt"), "--extract", "regex:("])
    assert res.exit_code == 2 and "bad regular expression" in res.output
    assert "Traceback" not in res.output


def test_cli_eval_of_a_per_layer_variant(tiny_model_dir, sample_text_file, tmp_path):
    from typer.testing import CliRunner

    from nestprune.build import BuildConfig, build_artifact
    from nestprune.cli.main import app
    from nestprune.variant.materialize import materialize

    base = tiny_model_dir("llama-gqa", num_hidden_layers=4)
    art = build_artifact(base, sample_text_file, tmp_path / "a.nestprune",
                         BuildConfig(method="magnitude", samples=2, seq_len=16, device="cpu"))
    variant = tmp_path / "v30"
    materialize(art, base, variant, sparsity=0.3, layout="per-layer")
    runner = CliRunner()
    ppl = {}
    for name, d in (("dense", base), ("v30", variant)):
        res = runner.invoke(app, ["eval", str(d), "--ppl", str(sample_text_file), "--seq-len", "32", "--json",
                                  "--device", "cpu"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        ppl[name] = (doc["results"][0]["ppl"], doc["parameters"])
    assert ppl["v30"][1] < ppl["dense"][1]  # the variant really is smaller
    assert math.isfinite(ppl["v30"][0]) and ppl["v30"][0] != pytest.approx(ppl["dense"][0], rel=1e-4)
