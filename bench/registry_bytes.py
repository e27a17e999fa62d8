"""Bytes a registry pull reads against the variant's own size, with times, for local and S3 registries.

    python bench/registry_bytes.py [--layers 8 --hidden 1024 --intermediate 2816 --vocab 32000]

Makes a random bf16 Llama (GQA) of the given shape, a random-order artifact (``build --method random``:
the cost of the nested order does not depend on which order), pushes it to a local directory and to moto's S3
server on 127.0.0.1, then pulls s = 0.1 … 0.5 from each with a cold chunk cache, counting every byte
the store returns (manifest, tags, files and chunks). Target: read ≤ 1.05 × the variant's size.
Writes a Markdown table (``--out``, default bench/results/registry.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from nestprune.build import BuildConfig, build_artifact  # noqa: E402
from nestprune.evaluate.tokenizer import save_tokenizer, train_bpe_tokenizer  # noqa: E402
from nestprune.registry import ChunkCache, open_store, push  # noqa: E402
from nestprune.registry.pull import pull  # noqa: E402
from nestprune.variant.materialize import materialize  # noqa: E402

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)
TEXT = "\n".join(f"the registry stores layer {i} of the model and a pull reads only what it keeps" for i in range(200))


class CountingStore:
    """Wraps a store and counts the bytes and requests it returns."""

    def __init__(self, inner):
        self.inner, self.url, self.read_only = inner, inner.url, inner.read_only
        self.bytes = self.requests = 0
        self._lock = threading.Lock()

    def _count(self, data: bytes) -> bytes:
        with self._lock:
            self.bytes += len(data)
            self.requests += 1
        return data

    def read(self, key):
        return self._count(self.inner.read(key))

    def read_range(self, key, start, end):
        return self._count(self.inner.read_range(key, start, end))

    def write(self, key, data):
        self.inner.write(key, data)

    def exists(self, key):
        return self.inner.exists(key)

    def list(self, prefix):
        return self.inner.list(prefix)


def make_base(path: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path))
    save_tokenizer(train_bpe_tokenizer([TEXT], vocab_size=300), path)
    return path


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "registry.md")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nestprune-bench-registry."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = make_base(work / "base", args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads,
                         args.vocab)
        (work / "calib.txt").write_text(TEXT)
        art = build_artifact(base, work / "calib.txt", work / "artifact",
                             BuildConfig(method="random", samples=2, seq_len=16, batch_size=2, max_sparsity=0.6))
        base_bytes = dir_bytes(base)
        print(f"base: {base_bytes / 2**20:.1f} MiB", flush=True)

        mat: dict[float, tuple[int, float]] = {}
        for s in SPARSITIES:
            t = time.perf_counter()
            materialize(art, base, work / f"mat-{s}", sparsity=s)
            mat[s] = (dir_bytes(work / f"mat-{s}"), time.perf_counter() - t)

        from registry_servers import s3_server

        rows = []
        with s3_server("bench") as _endpoint:
            for backend, url in (("local", str(work / "registry")), ("s3 (moto, loopback)", "s3://bench/registry")):
                t = time.perf_counter()
                pushed = push(url, art, base, name="bench")
                push_s = time.perf_counter() - t
                print(f"{backend}: push {push_s:.1f}s", flush=True)
                for s in SPARSITIES:
                    store = CountingStore(open_store(url))
                    out = work / f"pull-{s}"
                    t = time.perf_counter()
                    pull(f"{url}/bench", out, sparsity=s, cache=ChunkCache(work / f"cache-{backend}-{s}"), store=store)
                    secs = time.perf_counter() - t
                    assert all((out / f.name).read_bytes() == f.read_bytes() for f in (work / f"mat-{s}").iterdir())
                    own = dir_bytes(out)
                    rows.append((backend, s, store.bytes, own, store.requests, secs, push_s))
                    print(f"  s={s}: read {store.bytes / 2**20:.1f} MiB, variant {own / 2**20:.1f} MiB, "
                          f"x{store.bytes / own:.3f}, {secs:.2f}s", flush=True)
                    shutil.rmtree(out)
                # a second, overlapping pull with the cache of the s=0.1 pull: the s=0.3 variant is nested in it
                store = CountingStore(open_store(url))
                t = time.perf_counter()
                pull(f"{url}/bench", work / "warm", sparsity=0.3, cache=ChunkCache(work / f"cache-{backend}-0.1"),
                     store=store)
                warm = (backend, store.bytes, store.requests, time.perf_counter() - t)
                shutil.rmtree(work / "warm")
                rows.append(("warm", *warm))
                del pushed
        write_report(args, base_bytes, mat, rows)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def write_report(args, base_bytes: int, mat: dict, rows: list) -> None:
    mib = 2**20
    lines = [
        "# Registry pull: bytes read vs the variant's own size",
        "",
        f"Command: `python bench/registry_bytes.py --layers {args.layers} --hidden {args.hidden} "
        f"--intermediate {args.intermediate} --heads {args.heads} --kv-heads {args.kv_heads} --vocab {args.vocab}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f} at the end: times are indicative, bytes are exact), CPU only, "
        f"torch {torch.__version__}, "
        f"Python {platform.python_version()}. Model: random bf16 Llama, {args.layers} layers, hidden {args.hidden}, "
        f"MLP {args.intermediate}, {args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}; "
        f"base weights {base_bytes / mib:.1f} MiB. Ranking: `build --method random` (GQA query mode). "
        "Registry chunks: one per head, 32 MLP channels per chunk (the default).",
        "",
        "Every pull starts with an empty chunk cache; *read* counts every byte the store returned (manifest, "
        "version and tag records, artifact and tokenizer files, chunks). *variant* is the size of the pulled "
        "safetensors, which are byte-identical to `nestprune materialize` (checked by the script). Target: "
        "read/variant ≤ 1.05. Both backends pull through a chunk cache (cold), as a remote pull does by "
        "default; moto's S3 server runs in the same process as the client.",
        "",
        "| backend | sparsity | read (MiB) | variant (MiB) | read / variant | requests | pull (s) | materialize from local base (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r[0] == "warm":
            continue
        backend, s, read, own, reqs, secs, _ = r
        lines.append(f"| {backend} | {s:.1f} | {read / mib:.1f} | {own / mib:.1f} | {read / own:.3f} | {reqs} | "
                     f"{secs:.2f} | {mat[s][1]:.2f} |")
    lines += ["", "Push (once per backend):", ""]
    seen = set()
    for r in rows:
        if r[0] != "warm" and r[0] not in seen:
            seen.add(r[0])
            lines.append(f"- {r[0]}: {r[6]:.1f} s for {base_bytes / mib:.1f} MiB of weights")
    lines += ["", "Second, overlapping pull (s = 0.3 into the cache of the s = 0.1 pull, whose kept chunks "
              "contain those of s = 0.3):", ""]
    for r in rows:
        if r[0] == "warm":
            _, backend, read, reqs, secs = r
            lines.append(f"- {backend}: read {read / 1024:.1f} KiB in {reqs} requests (manifest and records only), "
                         f"{secs:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    print(json.dumps({"rows": [list(map(str, r)) for r in rows]}))


if __name__ == "__main__":
    main()
