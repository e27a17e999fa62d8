"""Benchmark task builders (nestprune.tasks): deterministic, well-formed, no leakage between splits."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from nestprune.errors import NestpruneError
from nestprune.evaluate.tasks import (
    cloze_items,
    decision_task,
    find_blanks,
    generation_task,
    make_problem,
    mix_problems,
    problems,
    term_kind,
    write_documents,
)
from nestprune.io.text import read_documents
from nestprune.objectives.answer import AnswerObjective
from nestprune.objectives.items import join_choice
from nestprune.objectives.margin import MarginObjective

CORPUS = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "corpus", Path("/work/shared/corpus"))
               if p.is_dir()), Path("shared/corpus"))


def _bench_script(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
SUBSYSTEMS = ["page", "lock", "irq", "dma", "usb", "pci", "net", "fs", "mm", "tty", "gpio", "clk"]


def synthetic_docs(n_docs: int, seed: int) -> list[str]:
    """Documents of technical-looking prose with identifiers of every kind, some repeated in a doc."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        sub = SUBSYSTEMS[d % len(SUBSYSTEMS)]
        names = [f"{sub}_{verb}_{d}" for verb in ("alloc", "free", "map", "unmap")]
        consts = [f"{sub.upper()}_FLAG_{k}{d}" for k in range(3)]
        lines = [f"The {sub} layer of document {d} keeps its state in a table of entries."]
        for _ in range(12):
            lines.append(
                f"Call {rng.choice(names)} with {rng.choice(consts)} set, then read "
                f"``{sub}.state{d}`` and pass {rng.randint(10, 999)} as the size of PageTable{d} here."
            )
            lines.append(f"    {rng.choice(consts)} = {rng.randint(10, 99)}")  # indented code: blank after spaces
        docs.append("\n".join(lines))
    return docs


def test_term_kinds():
    assert term_kind("i2c_smbus_read_word_data") == "snake"
    assert term_kind("I2C_FUNC_SMBUS_PEC") == "constant"
    assert term_kind("os.path.join") == "dotted"
    assert term_kind("PyTypeObject") == "camel"
    assert term_kind("0x43") == term_kind("512") == "number"
    assert term_kind("7") is None and term_kind("kernel") is None
    assert term_kind("make", literal=True) == "word"
    blanks = find_blanks("x" * 30 + " call kmem_cache_alloc and ``GFP_KERNEL``, not 7.", min_context_chars=10)
    assert [(b.choice, b.kind) for b in blanks] == [("kmem_cache_alloc", "snake"), ("``GFP_KERNEL``", "literal:constant")]


def test_cloze_items_are_well_formed():
    docs = synthetic_docs(12, seed=0)
    items = cloze_items(docs, 80, seed=3, context_chars=200, min_context_chars=60, per_doc=10)
    assert len(items) == 80
    assert max(sum(it["doc"] == d for it in items) for d in range(12)) <= 10
    for it in items:
        doc, choices, answer = docs[it["doc"]], it["choices"], it["choices"][it["answer"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        # prompt and true choice, joined as objective and evaluator join them, are the original text
        ctx, cont = join_choice(it["prompt"], answer)
        start = it["offset"] + len(answer) - len(ctx + cont)
        assert doc[start : it["offset"] + len(answer)] == ctx + cont
        assert start == it["offset"] - len(it["prompt"]) - (not it["prompt"][-1].isspace())
        assert 0 < len(it["prompt"]) <= 200 and (start == 0 or doc[start - 1].isspace())  # no partial word
        assert it["in_context"] == (answer in it["prompt"])
        kind = it["kind"].removeprefix("literal:")
        for c in choices:
            assert term_kind(c.strip("`"), c.startswith("``")) == kind
        for c in choices:
            if c != answer:
                assert c not in it["prompt"]
                assert any(c in other for j, other in enumerate(docs) if j != it["doc"])
    assert {it["kind"] for it in items} >= {"snake", "constant", "literal:dotted", "number", "camel"}
    assert any(it["prompt"].endswith("\n    ") for it in items)  # indented blanks keep their spaces
    assert 0.15 < sum(it["answer"] == 0 for it in items) / len(items) < 0.4  # answer positions shuffled


def test_cloze_is_deterministic_and_modes_filter():
    docs = synthetic_docs(10, seed=1)
    a = cloze_items(docs, 40, seed=5, context_chars=200, min_context_chars=60)
    assert a == cloze_items(docs, 40, seed=5, context_chars=200, min_context_chars=60)
    assert a != cloze_items(docs, 40, seed=6, context_chars=200, min_context_chars=60)
    copy = cloze_items(docs, 30, seed=5, context_chars=200, min_context_chars=60, mode="copy")
    recall = cloze_items(docs, 30, seed=5, context_chars=200, min_context_chars=60, mode="recall")
    assert copy and recall and all(it["in_context"] for it in copy) and not any(it["in_context"] for it in recall)
    with pytest.raises(NestpruneError, match="mode"):
        cloze_items(docs, 3, mode="both")


def test_decision_task_splits_do_not_leak():
    calib_docs = synthetic_docs(8, seed=2)
    eval_docs = calib_docs[:2] + synthetic_docs(8, seed=3)[2:]  # two documents shared on purpose
    calib, evals = decision_task(calib_docs, eval_docs, 60, 60, seed=0, context_chars=200, min_context_chars=60)
    key = lambda it: (it["prompt"][-200:], it["choices"][it["answer"]])  # noqa: E731
    assert calib and evals
    assert not {key(it) for it in calib} & {key(it) for it in evals}


@pytest.mark.skipif(not (CORPUS / "valid.txt.xz").exists(), reason="shared corpus not present")
def test_cloze_on_the_real_corpus_feeds_the_margin_objective(tmp_path, tokenizer):
    docs = read_documents(CORPUS / "valid.txt.xz")
    items = cloze_items(docs, 60, seed=0)
    assert len(items) == 60 and len({it["doc"] for it in items}) >= 20
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    objective = MarginObjective.from_jsonl(path, tokenizer, samples=8, seq_len=64)
    prov = objective.provenance()
    assert prov["items"] == 8 and prov["positives"] == 8 and prov["negatives"] == 24


def _solve(prompt: str) -> str:
    if m := re.fullmatch(r"Q: (\d+)([+-])(\d+)=\? A:", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := re.fullmatch(r"Q: ((?:[a-z]=\d )*[a-z]=\d)\. ([a-z])\? A:", prompt):
        return dict(kv.split("=") for kv in m[1].split())[m[2]]
    if m := re.fullmatch(r"Q: repeat ([a-z ]+) A:", prompt):
        return m[1]
    raise AssertionError(prompt)


def test_problems_are_correct_distinct_and_split():
    calib, evals = generation_task(200, 200, seed=0)
    for p in calib + evals:
        assert p["response"] == " " + _solve(p["prompt"]) and p["answer"] == _solve(p["prompt"])
    assert len({p["prompt"] for p in calib}) == 200 and len({p["prompt"] for p in evals}) == 200
    assert not {p["prompt"] for p in calib} & {p["prompt"] for p in evals}
    assert {p["kind"] for p in calib} == {"add", "sub", "lookup", "copy"}
    assert (calib, evals) == generation_task(200, 200, seed=0)
    assert calib != generation_task(200, 200, seed=1)[0]
    assert [p["kind"] for p in problems(3, kinds=("add",))] == ["add"] * 3
    add_calib, add_eval = generation_task(1500, 1500, seed=0, kinds=("add",))  # 8100 prompts: would collide
    assert not {p["prompt"] for p in add_calib} & {p["prompt"] for p in add_eval}
    with pytest.raises(NestpruneError, match="unknown problem kind"):
        make_problem("mul", random.Random(0))


def test_mix_problems_share_and_exclusion():
    docs = ["the kernel maps each page of memory into the process. " * 40] * 50
    calib, evals = generation_task(300, 300, seed=0, kinds=("add",))
    held_out = {p["prompt"] for p in calib + evals}
    mixed = mix_problems(docs, 0.1, seed=4, kinds=("add",), exclude=held_out)
    extra = [d for d in mixed if d.startswith("Q: ")]
    assert len(mixed) == len(docs) + len(extra) and extra
    share = sum(map(len, extra)) / sum(map(len, mixed))
    assert 0.09 < share < 0.12
    prompts = [line.rsplit(" A:", 1)[0] + " A:" for d in extra for line in d.splitlines()]
    assert prompts and not set(prompts) & held_out
    for line in (line for d in extra for line in d.splitlines()):
        prompt, answer = line.split(" A: ")
        assert answer == _solve(prompt + " A:")
    assert mixed == mix_problems(docs, 0.1, seed=4, kinds=("add",), exclude=held_out)
    assert mix_problems(docs, 0.0) == docs


def test_cli_writes_the_files(tmp_path, capsys, tokenizer):
    main = _bench_script("make_tasks").main
    corpus = tmp_path / "corpus"
    write_documents(corpus / "valid.txt.xz", synthetic_docs(8, seed=4))
    write_documents(corpus / "test.txt.xz", synthetic_docs(8, seed=5))
    assert read_documents(corpus / "valid.txt.xz") == synthetic_docs(8, seed=4)
    out = tmp_path / "out"
    main(["decision", "--corpus", str(corpus), "--out", str(out), "--calib-items", "20", "--eval-items", "30",
          "--context-chars", "200"])
    calib = [json.loads(line) for line in (out / "decision_calib.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "decision_eval.jsonl").read_text().splitlines()]
    info = json.loads((out / "decision.json").read_text())
    assert len(calib) == 20 and len(evals) == 30 and info["eval"]["items"] == 30
    assert all(set(it) >= {"prompt", "choices", "answer"} for it in calib + evals)
    write_documents(corpus / "train.txt.xz", synthetic_docs(12, seed=6))
    main(["decision", "--corpus", str(corpus), "--out", str(out / "tr"), "--calib-split", "train",
          "--eval-split", "valid,test", "--calib-items", "10", "--eval-items", "2000", "--context-chars", "200"])
    info = json.loads((out / "tr" / "decision.json").read_text())
    assert [s["split"] for s in info["eval"]["sources"]] == ["valid", "test"]
    one_split = cloze_items(synthetic_docs(8, seed=5), 2000, seed=1, context_chars=200)
    assert info["eval"]["items"] > len(one_split)  # two splits hold more items than one
    with pytest.raises(SystemExit, match="overlap"):
        main(["decision", "--corpus", str(corpus), "--out", str(out), "--calib-split", "valid,test"])
    main(["generation", "--out", str(out), "--calib-items", "12", "--eval-items", "8", "--kinds", "copy,lookup"])
    gen = out / "generation_calib.jsonl"
    assert len(gen.read_text().splitlines()) == 12
    objective = AnswerObjective.from_jsonl(gen, tokenizer)
    batch = next(objective.batches(64))
    labelled = [tokenizer.decode([t for t in row if t != -100]) for row in batch["labels"].tolist()]
    responses = {json.loads(line)["response"] for line in gen.read_text().splitlines()}
    assert set(labelled) == responses
    capsys.readouterr()
