"""Margin, answer-only and user objectives (nestprune.objectives): CPU, tiny models, exact values."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from nestprune.errors import NestpruneError
from nestprune.io.text import sha256_file
from nestprune.objectives import (
    OBJECTIVES,
    AnswerConfig,
    CustomConfig,
    LmConfig,
    MarginConfig,
    make_objective,
    parse_options,
)
from nestprune.objectives.answer import AnswerObjective
from nestprune.objectives.base import Objective
from nestprune.objectives.custom import load_objective
from nestprune.objectives.items import AnswerItem, ChoiceItem, encode_pairs, join_choice
from nestprune.objectives.lm import LanguageModeling
from nestprune.objectives.margin import MarginObjective
from nestprune.objectives.sequences import length_batches, length_limit, truncate_left

HERE = Path(__file__).parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)

CHOICE_ITEMS = [
    ChoiceItem("the kernel maps each page", ("of memory", "into the process", "python"), 0),
    ChoiceItem("python reads the file", ("in order", "the kernel", "page"), 2),
    ChoiceItem("memory", ("maps each page of memory into the process", "reads"), 1),
    ChoiceItem("the process and python reads the file in", ("order", "each"), 0),
    ChoiceItem("each page of", ("memory", "the kernel maps", "file", "reads the"), 3),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls are slower with a contended thread pool than on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def split_encode(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """The continuation's tokens as those following the prompt's in the whole text's encoding."""
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx
    return ctx, whole[len(ctx) :]


def answer_ce(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Mean CE of ``answer`` given ``prompt``, one unpadded sequence, by hand."""
    ids = torch.tensor([prompt + answer])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    pos = torch.arange(len(prompt), len(prompt) + len(answer))
    return -logp[pos - 1, torch.tensor(answer)].mean()


def decoder_weights(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}


def scores_from(model, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (p.detach() * grads[n]).abs() for n, p in decoder_weights(model).items()}


def test_margin_score_equals_brute_force(tokenizer):
    model = make_tiny_model("llama-gqa", num_layers=2, vocab_size=len(tokenizer))
    # brute force: separate passes over the correct and the incorrect options, plain autograd
    pos, neg = [], []
    for it in CHOICE_ITEMS:
        for j, c in enumerate(it.choices):
            (pos if j == it.answer else neg).append(split_encode(tokenizer, it.prompt, " " + c))
    weights = decoder_weights(model)
    grad_sets, values = [], []
    for group in (pos, neg):
        model.zero_grad()
        value = torch.stack([answer_ce(model, p, a) for p, a in group]).mean()
        value.backward()
        grad_sets.append({n: w.grad.clone() for n, w in weights.items()})
        values.append(value.item())
    expected = scores_from(model, {n: grad_sets[0][n] - grad_sets[1][n] for n in weights})
    assert sum(s.sum() for s in expected.values()) > 0

    objective = MarginObjective(CHOICE_ITEMS, tokenizer, seq_len=64)
    assert objective.provenance()["positives"] == 5 and objective.provenance()["negatives"] == 9
    for batch_size in (1, 4, 100):
        model.zero_grad()
        total = 0.0
        n_batches = 0
        for batch in objective.batches(batch_size):
            loss = objective.loss(model, batch)
            loss.backward()
            total += loss.item()
            n_batches += 1
        assert n_batches == -(-14 // batch_size)
        assert total == pytest.approx(values[0] - values[1], abs=1e-5)
        got = scores_from(model, {n: w.grad for n, w in weights.items()})
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7, msg=f"{n} at batch {batch_size}")


def test_margin_reference_template_and_batches_by_length(tokenizer):
    objective = MarginObjective(CHOICE_ITEMS[:2], tokenizer, prompt_template="Question: {prompt}\nAnswer:")
    batch = next(objective.batches(100))
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert tokenizer.decode(row).startswith("Question: ")
    assert "\nAnswer: " in tokenizer.decode(row)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == batch["input_ids"].shape[1]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    with pytest.raises(NestpruneError, match="template"):
        MarginObjective(CHOICE_ITEMS, tokenizer, prompt_template="Q: {question}")


def _rows_by_length(objective, batch_size=100):
    batch = next(objective.batches(batch_size))
    return batch, batch["attention_mask"].sum(1).tolist()


def test_join_and_encoding_follow_the_evaluator(tokenizer):
    from nestprune.evaluate import metrics as evaluate

    assert join_choice("Answer:", "85") == ("Answer:", " 85")
    assert join_choice("line\n", "x") == ("line\n", "x")  # no separator after whitespace
    assert join_choice("call  ", "foo") == ("call", "  foo")  # trailing spaces move over
    assert join_choice("a", " b") == ("a", " b")
    objective = MarginObjective(CHOICE_ITEMS, tokenizer, seq_len=64, prompt_template="Q: {prompt}\nA:")
    got = sorted((p, a) for p, a in objective.data.sequences)

    def encode_like_lm_eval(context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Written out independently: the continuation is what follows the context's tokens."""
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        if whole[: len(ctx)] != ctx:
            return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return ctx, whole[len(ctx):]

    expected = sorted(
        encode_like_lm_eval(*join_choice("Q: " + it.prompt + "\nA:", c, " "))
        for it in CHOICE_ITEMS for c in it.choices
    )
    assert got == expected
    # the evaluator scores with the very same joining and encoding
    assert evaluate.join_choice is join_choice and evaluate.encode_pairs is encode_pairs
    empty = MarginObjective([ChoiceItem("", ("page", "file"), 0)], tokenizer)
    assert [p for p, _ in empty.data.sequences] == [[tokenizer.bos_token_id]] * 2


def test_answer_labels_mask_prompt_and_padding_exactly(tokenizer):
    items = [AnswerItem("the kernel maps each page of memory into", " the process"),
             AnswerItem("python reads", " the file in order"),
             AnswerItem("memory", " page")]
    objective = AnswerObjective(items, tokenizer)  # the fixture has no chat template
    assert objective.provenance()["chat_template"] is False
    batch, lengths = _rows_by_length(objective)
    width = batch["input_ids"].shape[1]
    expected_rows = []
    for it in items:
        expected_rows.append(split_encode(tokenizer, it.prompt, it.response))
    expected_rows.sort(key=lambda pa: -(len(pa[0]) + len(pa[1])))
    assert lengths == [len(p) + len(a) for p, a in expected_rows]
    for r, (p, a) in enumerate(expected_rows):
        pad = width - len(p) - len(a)
        assert batch["labels"][r].tolist() == [-100] * len(p) + a + [-100] * pad
        assert batch["input_ids"][r].tolist() == p + a + [tokenizer.pad_token_id] * pad
        assert batch["attention_mask"][r].tolist() == [1] * (len(p) + len(a)) + [0] * pad
    decoded = sorted(tokenizer.decode([t for t in row if t != -100]) for row in batch["labels"].tolist())
    assert decoded == sorted(it.response for it in items)


def test_answer_labels_with_chat_template(tokenizer):
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT_TEMPLATE
    items = [AnswerItem("maps each page", "of memory"), AnswerItem("python reads the file", "in order")]
    objective = AnswerObjective(items, chat_tok)
    assert objective.provenance()["chat_template"] is True
    batch, lengths = _rows_by_length(objective)
    texts = {}
    for r in range(2):
        ids = batch["input_ids"][r, : lengths[r]].tolist()
        labels = batch["labels"][r].tolist()
        n_prompt = next(i for i, t in enumerate(labels) if t != -100)
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt : lengths[r]] == ids[n_prompt:]
        assert labels[lengths[r] :] == [-100] * (len(labels) - lengths[r])
        prompt_text = tokenizer.decode(ids[:n_prompt], skip_special_tokens=False)
        texts[prompt_text] = tokenizer.decode(ids[n_prompt:], skip_special_tokens=False)
    assert texts == {
        "<s>user: maps each page</s><s>assistant:": " of memory</s>",
        "<s>user: python reads the file</s><s>assistant:": " in order</s>",
    }
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{{ raise_exception('needs a system turn') }}"
    with pytest.raises(NestpruneError, match="chat template failed.*needs a system turn.*--no-chat-template"):
        AnswerObjective(items, broken)
    assert AnswerObjective(items, broken, chat_template=False).provenance()["chat_template"] is False
    # turned off: the same tokenizer, plain prompt + response
    plain = AnswerObjective(items, chat_tok, chat_template=False)
    assert plain.provenance()["chat_template"] is False
    b, lens = _rows_by_length(plain)
    decoded = {tokenizer.decode(b["input_ids"][r, : lens[r]].tolist()) for r in range(2)}
    assert decoded == {"maps each pageof memory", "python reads the filein order"}


def test_left_truncation_keeps_the_answer(tokenizer):
    assert truncate_left([1, 2, 3, 4, 5, 6], [7, 8], 5) == [4, 5, 6]
    assert truncate_left([1, 2, 3, 4, 5, 6], [7, 8], 5, keep=1) == [1, 5, 6]  # a BOS stays
    assert truncate_left([1, 2, 3], [4, 5, 6, 7], 3) == [3]  # answer longer than the limit: one prompt token
    assert truncate_left([1, 2], [3], 8) == [1, 2]

    long_prompt = " ".join(["the kernel maps each page of memory"] * 6) + " python reads"
    items = [AnswerItem(long_prompt, " the file in order"), AnswerItem("memory", " page")]
    full_prompt, answer = split_encode(tokenizer, long_prompt, " the file in order")
    objective = AnswerObjective(items, tokenizer, seq_len=len(answer) + 4)
    batch = next(objective.batches(8))
    row = batch["input_ids"][0].tolist()
    assert row == full_prompt[-4:] + answer
    assert [t for t in batch["labels"][0].tolist() if t != -100] == answer
    assert objective.provenance()["truncated"] == 1 and objective.provenance()["seq_len"] == len(answer) + 4


def test_sequence_length_from_data_percentile(tokenizer):
    assert length_limit(list(range(1, 101)), 99) == 99
    assert length_limit([5, 1, 3], 100) == 5
    short = [ChoiceItem("memory", ("page", "file"), 0)] * 199
    long = [ChoiceItem(" ".join(["python reads the file in order"] * 5), ("page", "file"), 1)]
    objective = MarginObjective(short + long, tokenizer)
    limit = len(tokenizer("memory page")["input_ids"])
    prov = objective.provenance()
    assert prov["seq_len"] == limit and prov["seq_len_rule"] == "p99 of lengths"
    cap = limit - 1
    capped = MarginObjective(short + long, tokenizer, seq_len=cap).provenance()
    over = sum(len(tokenizer(f"memory {c}")["input_ids"]) > cap for c in ("page", "file"))
    assert capped["seq_len"] == cap and capped["seq_len_rule"] == f"p99 of lengths, at most {cap}"
    assert capped["truncated"] == 199 * over + 2 and over >= 1
    assert MarginObjective(short + long, tokenizer, seq_len=1000).provenance()["seq_len"] == limit
    assert prov["truncated"] == 2  # both options of the long item lost prompt tokens
    assert max(objective.data.lengths) == limit


def test_length_batches():
    assert length_batches([3, 5, 1, 5], 2) == [[1, 3], [0, 2]]
    assert length_batches([10, 10, 4, 4, 4], 8, batch_tokens=20) == [[0, 1], [2, 3, 4]]
    assert length_batches([30, 4], 8, batch_tokens=20) == [[0], [1]]


def test_budget_and_samples_are_seeded(tokenizer):
    items = [ChoiceItem(f"page {i} of memory", ("python", "kernel"), i % 2) for i in range(40)]
    a = MarginObjective(items, tokenizer, samples=10, seed=1)
    b = MarginObjective(items, tokenizer, samples=10, seed=1)
    c = MarginObjective(items, tokenizer, samples=10, seed=2)
    assert a.provenance()["items"] == 10 and a.data.sequences == b.data.sequences
    assert a.data.sequences != c.data.sequences
    used = [MarginObjective(items, tokenizer, samples=k, seq_len=64).provenance()["tokens_used"] for k in (7, 8)]
    budget = MarginObjective(items, tokenizer, seq_len=64, max_tokens=used[0] + 1)
    assert used[1] > used[0] + 1
    assert budget.provenance()["items"] == 7 and budget.provenance()["tokens_used"] == used[0]


def test_malformed_jsonl_names_the_line(tmp_path, tokenizer):
    good = {"prompt": "memory", "choices": ["page", "file"], "answer": 0}
    bad_json = write_jsonl(tmp_path / "a.jsonl", [good, "", '{"prompt": "x", "choices": ['])
    with pytest.raises(NestpruneError, match=r"a\.jsonl:3: not valid JSON"):
        MarginObjective.from_jsonl(bad_json, tokenizer)
    no_choices = write_jsonl(tmp_path / "b.jsonl", [good, {"prompt": "memory", "answer": 0}])
    with pytest.raises(NestpruneError, match=r"b\.jsonl:2: needs a field 'choices'"):
        MarginObjective.from_jsonl(no_choices, tokenizer)
    bad_index = write_jsonl(tmp_path / "c.jsonl", [good, good, {**good, "answer": 2}])
    with pytest.raises(NestpruneError, match=r"c\.jsonl:3: 'answer' must be the index"):
        MarginObjective.from_jsonl(bad_index, tokenizer)
    not_object = write_jsonl(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(NestpruneError, match=r"d\.jsonl:1: expected a JSON object"):
        AnswerObjective.from_jsonl(not_object, tokenizer)
    no_response = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(NestpruneError, match=r"e\.jsonl:2: needs a non-empty string field 'response'"):
        AnswerObjective.from_jsonl(no_response, tokenizer)


def test_lm_eval_aliases(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"question": "memory", "options": ["page", "file"], "label": "B"},
        {"ctx": "python reads", "endings": ["the file", "page"], "gold": 0},
        {"query": "kernel", "choices": ["maps", "reads"], "answer": "maps"},
    ])
    objective = MarginObjective.from_jsonl(path, tokenizer, seed=0)
    assert objective.provenance()["items"] == 3 and objective.provenance()["positives"] == 3
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": 4}])
    answer = AnswerObjective.from_jsonl(gsm, tokenizer, separator=" ")
    assert answer.provenance()["items"] == 2
    labelled = sorted(tokenizer.decode([t for t in row if t != -100]) for row in next(answer.batches(2))["labels"].tolist())
    assert labelled == [" 2", " 4"]


def test_provenance_records_data_and_tokens(tmp_path, tokenizer):
    rows = [{"prompt": it.prompt, "choices": list(it.choices), "answer": it.answer} for it in CHOICE_ITEMS]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    objective = make_objective(MarginConfig(), path, tokenizer, seed=3)
    prov = objective.provenance()
    mask_tokens = sum(int(b["attention_mask"].sum()) for b in objective.batches(2))
    label_tokens = sum(int((b["labels"] != -100).sum()) for b in objective.batches(2))
    assert prov["objective"] == "margin" and prov["sha256"] == sha256_file(path) and prov["source"] == str(path)
    assert prov["items"] == 5 and prov["sequences"] == 14
    assert prov["tokens_used"] == mask_tokens and prov["answer_tokens"] == label_tokens
    assert prov["separator"] == " " and prov["prompt_template"] == "{prompt}" and prov["seed"] == 3
    json.dumps(prov)


def test_make_objective_dispatch(tmp_path, tokenizer, sample_text_file):
    lm = make_objective(LmConfig(samples=3, seq_len=16), sample_text_file, tokenizer, seed=0)
    assert isinstance(lm, LanguageModeling) and lm.provenance()["tokens_used"] == 48
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "python reads", "response": " the file"}])
    answer = make_objective(AnswerConfig(chat_template=False), qa, tokenizer)
    assert isinstance(answer, AnswerObjective) and answer.provenance()["objective"] == "answer"
    with pytest.raises(NestpruneError, match="unknown objective 'ppl'"):
        OBJECTIVES.config_class("ppl")
    with pytest.raises(NestpruneError, match="needs a callable"):
        CustomConfig()


def test_custom_objective_from_module_and_file(tmp_path, tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    import objective_plugin

    objective_plugin.CALLS.clear()
    data = tmp_path / "first.txt"
    data.write_text("the kernel maps each page\nignored line\n")
    model = make_tiny_model("llama", num_layers=2, vocab_size=len(tokenizer))
    for spec in ("objective_plugin:make", f"{HERE / 'objective_plugin.py'}:make"):
        objective = make_objective(CustomConfig(fn=spec, samples=7, options={"copies": 3}), data, tokenizer)
        assert isinstance(objective, Objective)
        assert objective.name == "first-words"
        batches = list(objective.batches(4))
        assert len(batches) == 3
        total = sum(objective.loss(model, b) for b in batches)
        ids = torch.tensor([tokenizer("the kernel maps each page")["input_ids"]])
        logits = model(input_ids=ids).logits
        expected = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        torch.testing.assert_close(total, expected)
        prov = objective.provenance()
        assert prov["objective"] == "custom" and prov["callable"] == spec and prov["name"] == "first-words"
        assert prov["sha256"] == sha256_file(data) and prov["options"]["copies"] == 3
        assert prov["options"]["samples"] == 7
        assert prov["details"] == {"tokens": ids.shape[1], "copies": 3}
    assert objective_plugin.CALLS[0][0] == data and objective_plugin.CALLS[0][1]["copies"] == 3
    assert len(objective_plugin.CALLS) == 1  # the file form loads its own copy of the module


@pytest.mark.parametrize("spec, message", [
    ("objective_plugin:NOT_CALLABLE", "is not callable"),
    ("objective_plugin:missing", "has no attribute 'missing'"),
    ("no_such_module_xyz:make", "cannot import objective module 'no_such_module_xyz'"),
    ("missing_dir/plugin.py:make", "no such file"),
    ("objective_plugin:not_an_objective", "not an Objective"),
    ("objective_plugin:wrong_signature", r"must accept \(tokenizer, data_path, options\)"),
    ("objective_plugin", "must look like"),
])
def test_custom_objective_errors_are_one_line(spec, message, tmp_path, tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(NestpruneError, match=message) as err:
        load_objective(spec, tokenizer, tmp_path / "x.txt", {})
    assert "\n" not in str(err.value)


def test_library_callable_and_options(tmp_path, tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    import objective_plugin

    data = tmp_path / "d.txt"
    data.write_text("python reads\n")
    objective = load_objective(objective_plugin.make, tokenizer, data, {"copies": 2})
    assert len(list(objective.batches(1))) == 2
    assert objective.provenance()["callable"] == "objective_plugin:make"
    assert parse_options(["copies=3", "name=abc", "flag=true", "xs=[1,2]"]) == {
        "copies": 3, "name": "abc", "flag": True, "xs": [1, 2]}
    with pytest.raises(NestpruneError, match="KEY=VALUE"):
        parse_options(["novalue"])
