"""The writers' block jobs: job and hash block boundaries, the content check fed by the writer's own reads (every
block of the base hashed once, a changed byte anywhere refused, nothing published), memory bounded by the block
size whatever the tensor size, vector writes, and a local-registry pull checked and written straight from the
mapped blobs (corrupt, short and missing blobs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from safetensors.torch import load_file
from test_materialize import DictSource  # every tensor through take(): the reference bytes

from nestprune.artifact import read_artifact
from nestprune.build import BuildConfig, build_artifact
from nestprune.errors import NestpruneError
from nestprune.io import buffers, fingerprint
from nestprune.registry import push
from nestprune.registry.pull import pull
from nestprune.registry.stores import open_store
from nestprune.registry.versions import blob_key, read_manifest
from nestprune.variant import hf
from nestprune.variant.contents import plan_tensors
from nestprune.variant.materialize import materialize, materialize_variant, plan_target

HASH_BLOCK = 1000  # bytes per hash block of the content check: not a multiple of any row here (128, 192 bytes)
JOB_BLOCK = 2500  # the writer's block: two whole hash blocks per job


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer):
    """A llama-gqa base whose artifact's content fingerprint has HASH_BLOCK-byte blocks."""
    tmp = tmp_path_factory.mktemp("block-writer")
    base = save_tiny_model(make_tiny_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer, tmp / "base")
    (tmp / "calib.txt").write_text(SAMPLE_TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fingerprint, "BLOCK_BYTES", HASH_BLOCK)
        art = build_artifact(base, tmp / "calib.txt", tmp / "art",
                             BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.6))
    manifest, _ = read_artifact(art)
    assert manifest.base.content.block_bytes == HASH_BLOCK
    return base, art


def digests(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def reference(base: Path, art: Path, out: Path, sparsity: float, layout: str) -> Path:
    manifest, ranking = read_artifact(art)
    spec = plan_target(ranking, sparsity, None, layout, None)
    materialize_variant(DictSource(load_file(str(base / "model.safetensors"))), ranking, spec, base, out,
                        base=manifest.base, artifact_digest=manifest.digest())
    return out


def small_jobs(monkeypatch) -> None:
    monkeypatch.setattr(hf, "BLOCK_BYTES", JOB_BLOCK)
    monkeypatch.setattr(hf, "PARALLEL_MIN_BYTES", 0)  # threads even for a tiny model


def no_second_read(monkeypatch) -> None:
    """Fail if the content check has to read any tensor itself (every block must come from the writer's jobs)."""

    def hash_spans(spans, *a, **k):
        assert not spans, f"the check read {[s.name for s in spans]} again"
        return {}

    monkeypatch.setattr(fingerprint, "hash_spans", hash_spans)


def copy_base(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


def flip(model_dir: Path, name: str, at: int) -> None:
    """Flip one bit of byte ``at`` of tensor ``name`` in model_dir/model.safetensors."""
    spans = fingerprint.tensor_spans(model_dir)
    s = spans[name]
    assert 0 <= at < s.nbytes
    with open(s.file, "r+b") as f:
        f.seek(s.start + at)
        b = f.read(1)
        f.seek(s.start + at)
        f.write(bytes([b[0] ^ 0x10]))


# --- boundaries ---------------------------------------------------------------------------------------------

def test_job_blocks_cover_the_tensor_in_whole_hash_blocks():
    assert hf.job_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert hf.job_blocks(10, 7, hashed=3) == [(0, 6), (6, 10)]  # two whole hash blocks per job
    assert hf.job_blocks(10, 2, hashed=4) == [(0, 4), (4, 8), (8, 10)]  # a hash block larger than a job: one each
    assert hf.job_blocks(0, 4) == [(0, 0)] and hf.job_blocks(0, 4, hashed=3) == [(0, 0)]
    for size in (1, 999, 1000, 1001, 38400):
        for block, hashed in ((JOB_BLOCK, 0), (JOB_BLOCK, HASH_BLOCK), (300, HASH_BLOCK)):
            got = hf.job_blocks(size, block, hashed)
            assert got[0][0] == 0 and got[-1][1] == size
            assert all(b == a2 for (_, b), (a2, _) in zip(got[:-1], got[1:], strict=True))  # contiguous, no overlap
            if hashed:
                assert all(a % hashed == 0 for a, _ in got)  # every job starts on a hash block


@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
def test_small_blocks_write_what_take_writes_and_feed_every_hash_block(small, tmp_path, monkeypatch, layout):
    """Tensors of many jobs and many hash blocks, rows and hash blocks straddling job boundaries, on threads: the
    bytes are take()'s and the check needs no read of its own."""
    base, art = small
    want = reference(base, art, tmp_path / "want", 0.3, layout)
    small_jobs(monkeypatch)
    no_second_read(monkeypatch)
    res = materialize(art, base, tmp_path / "got", sparsity=0.3, layout=layout)
    assert res.base_check == "content"
    assert digests(tmp_path / "got") == digests(want)


def tensor_rows(base: Path, art: Path, name: str) -> tuple[np.ndarray, int, int]:
    """(kept index, axis, row bytes) of tensor ``name`` in the 0.3 per-layer variant."""
    _, ranking = read_artifact(art)
    spec = plan_target(ranking, 0.3, None, "per-layer", None)
    from nestprune.io.weights import SafetensorsSource

    with SafetensorsSource(base) as src:
        plan = next(p for p in plan_tensors(src, spec) if p.name == name)
        shape = src.shape(name)
    return plan.index, plan.axis, int(np.prod(shape[1:])) * plan.dtype.itemsize


@pytest.mark.parametrize("name", ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                  "lm_head.weight"])
def test_a_changed_byte_the_variant_drops_is_still_refused(small, tmp_path, monkeypatch, name):
    """The check covers every byte: a changed byte in a row or column the variant does not keep, in a later hash
    block of the tensor (row / column / whole-tensor jobs), is refused, and nothing is published."""
    base, art = small
    changed = copy_base(base, tmp_path / "changed")
    index, axis, row = tensor_rows(base, art, name)
    if index is None:  # kept whole: a byte in its last hash block
        at = fingerprint.tensor_spans(base)[name].nbytes - 1
    elif axis == 0:
        dropped = sorted(set(range(index.max() + 1)) - set(index.tolist()))
        at = dropped[-1] * row + 3  # a dropped row, past the first hash block
    else:
        cols = row // 4
        dropped = sorted(set(range(cols)) - set(index.tolist()))
        at = 20 * row + dropped[0] * 4 + 1  # row 20 (past the first hash block), a dropped column
    assert at >= HASH_BLOCK
    flip(changed, name, at)
    small_jobs(monkeypatch)
    out = tmp_path / "variants" / "v"
    out.parent.mkdir()
    with pytest.raises(NestpruneError, match=rf"1 of \d+ tensors hold other values \({name}\)"):
        materialize(art, changed, out, sparsity=0.3)
    assert list(out.parent.iterdir()) == []


def test_a_tensor_the_writer_does_not_read_in_blocks_is_read_by_the_check(small, tmp_path, monkeypatch):
    """A tensor written through take() (no fast path) is hashed by the check itself, before anything is
    published; every other tensor still comes from the writer's jobs."""
    base, art = small
    name = "model.layers.2.self_attn.q_proj.weight"
    real_jobs, read_again = hf.FileSpans.jobs, []
    monkeypatch.setattr(hf.FileSpans, "jobs", lambda self, p: None if p.name == name else real_jobs(self, p))
    real_hash = fingerprint.hash_spans

    def hash_spans(spans, *a, **k):
        read_again.extend(s.name for s in spans)
        return real_hash(spans, *a, **k)

    monkeypatch.setattr(fingerprint, "hash_spans", hash_spans)
    small_jobs(monkeypatch)
    materialize(art, base, tmp_path / "ok", sparsity=0.3)
    assert read_again == [name]
    assert digests(tmp_path / "ok") == digests(reference(base, art, tmp_path / "want", 0.3, "per-layer"))
    changed = copy_base(base, tmp_path / "changed")
    flip(changed, name, 2 * HASH_BLOCK + 7)
    with pytest.raises(NestpruneError, match="hold other values"):
        materialize(art, changed, tmp_path / "bad", sparsity=0.3)
    assert not (tmp_path / "bad").exists()


# --- memory -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("full_check", [False, True])
def test_what_a_job_holds_is_bounded_by_the_block_not_the_tensor(small, tmp_path, monkeypatch, full_check):
    """Every mapping and buffer a job holds is at most one job block plus one row, with or without the fused
    check (``--full-check`` hashes files instead: plain ``BLOCK_BYTES`` jobs), while tensors are 15x larger."""
    base, art = small
    small_jobs(monkeypatch)
    mapped_sizes, scratch_sizes = [], []
    real_mapped, real_scratch = hf.mapped, hf.scratch

    def mapped(fd, offset, length, **k):
        mapped_sizes.append(length)
        return real_mapped(fd, offset, length, **k)

    def scratch(n, slot=0):
        scratch_sizes.append(n)
        return real_scratch(n, slot)

    monkeypatch.setattr(hf, "mapped", mapped)
    monkeypatch.setattr(hf, "scratch", scratch)
    materialize(art, base, tmp_path / "v", sparsity=0.3, full_check=full_check)
    step = 2 * HASH_BLOCK if not full_check else JOB_BLOCK
    largest_row = 48 * 4  # down_proj: 48 fp32 columns
    largest_tensor = max(s.nbytes for s in fingerprint.tensor_spans(base).values())
    assert largest_tensor > 15 * step
    assert mapped_sizes and max(mapped_sizes) <= step + largest_row
    assert scratch_sizes and max(scratch_sizes) <= step + largest_row


def test_scratch_is_reused_per_thread_and_slot():
    a = buffers.scratch(1000, 7)
    b = buffers.scratch(800, 7)
    assert len(a) == 1000 and len(b) == 800 and a.obj is b.obj  # the same buffer, no fresh pages
    c = buffers.scratch(5000, 7)
    assert len(c) == 5000 and c.obj is not a.obj and buffers.scratch(10, 7).obj is c.obj
    assert buffers.scratch(10, 8).obj is not c.obj


# --- vector writes ------------------------------------------------------------------------------------------

def test_write_vector_batches_and_finishes_partial_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "WRITE_CHUNK", 10)
    monkeypatch.setattr(hf, "IOV_MAX", 3)
    real_pwritev, real_pwrite, calls = os.pwritev, os.pwrite, []

    def short_pwritev(fd, bufs, offset):  # the kernel may stop early: at most 7 bytes per call here
        calls.append((len(bufs), sum(len(b) for b in bufs)))
        joined = b"".join(bytes(b) for b in bufs)[:7]
        return real_pwritev(fd, [joined], offset)

    def short_pwrite(fd, data, offset):
        return real_pwrite(fd, bytes(data)[:4], offset)

    monkeypatch.setattr(hf.os, "pwritev", short_pwritev)
    monkeypatch.setattr(hf.os, "pwrite", short_pwrite)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (3, 1, 4, 25, 2, 2, 2, 2, 9, 0, 11, 5)]
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 5)
    fd = os.open(path, os.O_RDWR)
    try:
        n = hf.write_vector(fd, 5, [memoryview(p) for p in pieces])
    finally:
        os.close(fd)
    assert n == sum(map(len, pieces))
    assert path.read_bytes() == b"\xff" * 5 + b"".join(pieces)
    assert calls and all(k <= 3 and size <= 10 for k, size in calls)


# --- a local registry: checked and written straight from the mapped blobs -----------------------------------

@pytest.fixture()
def registry(small, tmp_path):
    base, art = small
    reg = tmp_path / "reg"
    r = push(reg, art, base, name="m", channel_block=1)
    return reg, read_manifest(open_store(reg), r.record.digest)


def test_mapped_pull_with_small_parts_equals_materialize(small, registry, tmp_path, monkeypatch):
    from nestprune.registry import source as source_mod

    base, art = small
    reg, _ = registry
    monkeypatch.setattr(source_mod, "PART_BYTES", 256)  # many parts per tensor, checked in parallel
    monkeypatch.setattr(source_mod, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(hf, "PARALLEL_MIN_BYTES", 0)
    held = []
    real_hold = source_mod.RegistrySource._hold
    monkeypatch.setattr(source_mod.RegistrySource, "_hold",
                        lambda self, *a: held.append(h := real_hold(self, *a)) or h)
    res = pull(f"{reg}/m", tmp_path / "got", sparsity=0.3, cache=None, jobs=4)
    assert held and all(h.mapped for h in held)  # nothing was copied out of the blobs
    assert res.stats.requests > 20
    materialize(art, base, tmp_path / "want", sparsity=0.3)
    assert digests(tmp_path / "got") == digests(tmp_path / "want")


@pytest.mark.parametrize("damage", ["flip", "short", "missing"])
def test_mapped_pull_refuses_a_damaged_blob_and_writes_nothing(registry, tmp_path, damage):
    reg, manifest = registry
    name = "model.layers.1.mlp.up_proj.weight"
    entry = manifest.tensors[name]
    blob = reg / blob_key(entry.blob)
    data = bytearray(blob.read_bytes())
    if damage == "flip":
        data[3] ^= 0x01  # chunk 0: what every variant keeps
        blob.write_bytes(bytes(data))
        match = rf"chunk 0 of tensor {name} .* fails its sha256 check"
    elif damage == "short":
        blob.write_bytes(bytes(data[: len(data) // 4]))
        match = rf"chunk \d+ of tensor {name} .* fails its sha256 check"
    else:
        blob.unlink()
        match = "is missing; the registry is damaged"
    out = tmp_path / "variants" / "v"
    out.parent.mkdir()
    with pytest.raises(NestpruneError, match=match):
        pull(f"{reg}/m", out, sparsity=0.3, cache=None)
    assert list(out.parent.iterdir()) == []
