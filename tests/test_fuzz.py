"""Fuzzing the inputs: random corruption of safetensors headers and bodies, of the artifact manifest and the
registry's JSON documents, bit flips in zarr chunks and registry blobs, random option values.

Every case ends in either success with the correct result (byte for byte what the clean inputs give) or
exactly one ``error:`` line with exit status 2 (bad input) — never a traceback, never an internal error,
never a partial output or a temporary left behind, never a changed input.

CI runs a fixed, derandomized budget (well under a minute); ``NESTPRUNE_FUZZ=long`` runs many more examples
with fresh randomness: ``NESTPRUNE_FUZZ=long .venv/bin/python -m pytest tests/test_fuzz.py`` (400 examples per
test; ``NESTPRUNE_FUZZ_EXAMPLES`` sets another number).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nestprune.build import BuildConfig, build_artifact
from nestprune.cli.main import app

settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=int(os.environ.get("NESTPRUNE_FUZZ_EXAMPLES", "400")), deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = "long" if os.environ.get("NESTPRUNE_FUZZ") == "long" else "ci"
runner = CliRunner()
SPARSITY = "0.3"


def tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tokenizer):
    """A base, its artifact, a registry holding both, and what a variant of them is (the reference)."""
    from nestprune.registry import push
    from nestprune.variant.materialize import materialize

    tmp = tmp_path_factory.mktemp("fuzz")
    base = save_tiny_model(make_tiny_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer, tmp / "base")
    (tmp / "calib.txt").write_text(SAMPLE_TEXT)
    cfg = BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.6)
    art = build_artifact(base, tmp / "calib.txt", tmp / "art", cfg)
    push(tmp / "reg", art, base, name="m")
    materialize(art, base, tmp / "reference", sparsity=float(SPARSITY))
    return {"base": base, "art": art, "reg": tmp / "reg", "reference": tree(tmp / "reference")}


@contextmanager
def workspace(clean: dict[str, Any], *names: str):
    """Fresh copies of the named inputs in a temporary directory (each example corrupts its own)."""
    with tempfile.TemporaryDirectory(prefix="nestprune-fuzz-") as d:
        work = Path(d)
        for n in names:
            shutil.copytree(clean[n], work / n)
        yield work


def check_outcome(result, work: Path, out: Path, reference: dict[str, str] | None, inputs: dict[str, str]) -> str:
    """Success with the reference output, or one ``error:`` line, exit 2, and nothing written."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    left = [p.name for p in out.parent.iterdir() if ".nestprune-" in p.name]
    assert not left, left
    assert {n: h for n, h in tree(work).items() if not n.startswith(out.name + "/")} == inputs  # inputs unchanged
    if result.exit_code == 0:
        if reference is not None:
            assert tree(out) == reference, "success, but the output differs from the clean inputs' output"
        return "ok"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and result.exit_code == 2, (result.exit_code, result.output)
    assert not any(line.startswith("error: internal error") for line in lines), result.output
    assert not out.exists(), "failed, but the output exists"
    return "error"


def run_materialize(work: Path, *extra: str):
    return runner.invoke(app, ["materialize", str(work / "art"), "--base", str(work / "base"), "--sparsity", SPARSITY,
                               "--out", str(work / "v"), *extra])


def materialize_outcome(work: Path, clean: dict[str, Any]) -> str:
    """Materialize the (corrupted) inputs in ``work``: the reference variant, or one error line."""
    inputs = tree(work)
    return check_outcome(run_materialize(work), work, work / "v", clean["reference"], inputs)


# --- strategies ----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def mutate_json(data: Any, draw) -> Any:
    """Replace, delete or retype one value somewhere in a JSON tree (chosen by ``draw``)."""
    if isinstance(data, dict) and data and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(data)))
        action = draw(st.sampled_from(["recurse", "delete", "replace"]))
        if action == "recurse":
            return {**data, key: mutate_json(data[key], draw)}
        if action == "delete":
            return {k: v for k, v in data.items() if k != key}
        return {**data, key: draw(json_values)}
    if isinstance(data, list) and data and draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        return [*data[:i], mutate_json(data[i], draw), *data[i + 1:]]
    return draw(json_values)


def flip_bits(raw: bytearray, draw, start: int = 0, end: int | None = None, max_flips: int = 8) -> None:
    end = len(raw) if end is None else end
    if end <= start:
        return
    for _ in range(draw(st.integers(1, max_flips))):
        i = draw(st.integers(start, end - 1))
        raw[i] ^= 1 << draw(st.integers(0, 7))


# --- safetensors ---------------------------------------------------------------------------------------------

@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_corrupt_base_safetensors(clean, data):
    draw = data.draw
    with workspace(clean, "base", "art") as work:
        f = work / "base" / "model.safetensors"
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        how = draw(st.sampled_from(["header bits", "body bits", "length", "truncate", "header json", "append"]))
        if how == "header bits":
            flip_bits(raw, draw, 8, 8 + n)
        elif how == "body bits":
            flip_bits(raw, draw, 8 + n, len(raw), max_flips=2)
        elif how == "length":
            raw[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        elif how == "truncate":
            raw = raw[:draw(st.integers(0, len(raw) - 1))]
        elif how == "header json":
            header = mutate_json(json.loads(raw[8:8 + n]), draw)
            text = json.dumps(header).encode()
            raw = bytearray(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        else:
            raw += draw(st.binary(min_size=1, max_size=64))
        f.write_bytes(bytes(raw))
        materialize_outcome(work, clean)


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_corrupt_base_config(clean, data):
    with workspace(clean, "base", "art") as work:
        f = work / "base" / "config.json"
        if data.draw(st.booleans()):
            f.write_text(json.dumps(mutate_json(json.loads(f.read_text()), data.draw)))
        else:
            raw = bytearray(f.read_bytes())
            flip_bits(raw, data.draw)
            f.write_bytes(bytes(raw))
        materialize_outcome(work, clean)


# --- the artifact: manifest JSON and zarr chunks -------------------------------------------------------------

@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_corrupt_artifact_manifest(clean, data):
    draw = data.draw
    with workspace(clean, "base", "art") as work:
        f = work / "art" / "zarr.json"
        doc = json.loads(f.read_text())
        if draw(st.booleans()):  # the manifest itself
            doc["attributes"]["nestprune"] = mutate_json(doc["attributes"]["nestprune"], draw)
        else:  # anything in the zarr metadata
            doc = mutate_json(doc, draw)
        f.write_text(json.dumps(doc))
        inputs = tree(work)
        outcome = check_outcome(run_materialize(work), work, work / "v", None, inputs)
        if outcome == "ok":  # an edit nothing depends on (e.g. a note in the trajectory): still the right variant
            assert {k: v for k, v in tree(work / "v").items() if k != "nestprune_variant.json"} == {
                k: v for k, v in clean["reference"].items() if k != "nestprune_variant.json"}
        r = runner.invoke(app, ["inspect", str(work / "art")])
        assert r.exit_code in (0, 2) and "Traceback" not in r.output, r.output
        if r.exit_code:
            assert sum(line.startswith("error: ") for line in r.output.splitlines()) == 1, r.output


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_bit_flips_in_zarr_chunks_and_array_metadata(clean, data):
    draw = data.draw
    with workspace(clean, "base", "art") as work:
        files = sorted(p for p in (work / "art" / "ranking").rglob("*") if p.is_file())
        target = draw(st.sampled_from(files))
        raw = bytearray(target.read_bytes())
        if draw(st.booleans()) or not raw:
            raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))]  # truncated (or emptied)
        else:
            flip_bits(raw, draw)
        target.write_bytes(bytes(raw))
        materialize_outcome(work, clean)


# --- the registry --------------------------------------------------------------------------------------------

def registry_files(reg: Path) -> list[Path]:
    return sorted(p for p in reg.rglob("*") if p.is_file())


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_corrupt_registry_documents_and_blobs(clean, data):
    draw = data.draw
    with workspace(clean, "reg") as work:
        reg = work / "reg"
        files = registry_files(reg)
        target = draw(st.sampled_from(files))
        raw = target.read_bytes()
        if target.suffix == ".json" and draw(st.booleans()):
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            target.write_text(json.dumps(mutate_json(doc, draw)))
        elif draw(st.booleans()):
            b = bytearray(raw)
            flip_bits(b, draw)
            target.write_bytes(bytes(b))
        else:
            target.write_bytes(raw[:draw(st.integers(0, max(0, len(raw) - 1)))])
        inputs = tree(work)
        r = runner.invoke(app, ["pull", f"{reg}/m", "--sparsity", SPARSITY, "--out", str(work / "v")])
        check_outcome(r, work, work / "v", clean["reference"], inputs)


# --- option values -------------------------------------------------------------------------------------------

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 10**12).map(str),
                    st.sampled_from(["", " ", "0x10", "1e400", "-0", "0.3.1", "nan", "½", "4.5B", "120M", "3k"]),
                    st.text(max_size=6))


@settings(settings.get_profile(PROFILE))
@given(sparsity=st.one_of(st.none(), numbers), params=st.one_of(st.none(), numbers),
       layout=st.one_of(st.none(), st.sampled_from(["per-layer", "uniform", "diagonal", ""])),
       multiple_of=st.one_of(st.none(), numbers), fmt=st.one_of(st.none(), st.sampled_from(["hf", "gguf2", ""])))
def test_random_option_values(clean, sparsity, params, layout, multiple_of, fmt):
    from nestprune.cli.materialize import parse_params
    from nestprune.variant.materialize import materialize

    args = []
    for flag, value in (("--sparsity", sparsity), ("--params", params), ("--layout", layout),
                        ("--multiple-of", multiple_of), ("--format", fmt)):
        if value is not None:
            args += [flag, value]
    with workspace(clean, "base", "art") as work:
        inputs = tree(work)
        r = runner.invoke(app, ["materialize", str(work / "art"), "--base", str(work / "base"), "--out",
                                str(work / "v"), *args])
        if check_outcome(r, work, work / "v", None, inputs) == "ok":  # the CLI did what the library does
            materialize(work / "art", work / "base", work / "lib",
                        sparsity=float(sparsity) if sparsity is not None else None,
                        params=parse_params(params) if params is not None else None,
                        layout=layout or "per-layer", multiple_of=int(multiple_of) if multiple_of else None)
            assert tree(work / "v") == tree(work / "lib")
