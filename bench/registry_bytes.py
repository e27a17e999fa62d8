"""Registry pulls and pushes: bytes read against the variant's size, speed against a plain parallel transfer of
the same bytes, the client libraries side by side, and a load test — local, S3 (moto) and HTTP registries.

    python bench/registry_bytes.py [--layers 8 --hidden 1024 --intermediate 2816 --vocab 32000 --jobs 8
                                    --rounds 3 --load-pulls 32 --load-pushes 4]

Makes a random bf16 Llama (GQA) of the given shape and a random-order artifact (``build --method random``: the
cost of the nested order does not depend on which order). The S3 (moto) and HTTP (Range-honouring static)
servers run on 127.0.0.1, each in a process of its own. Sections of the report:

1. bytes: pulls of s = 0.1, 0.3, 0.5 from each backend with a cold chunk cache, counting every byte the store
   returns (manifest, records, files, chunks). Target: read ≤ 1.05 × the variant's size.
2. speed, in rounds (one baseline run and one nestprune run per round, seconds apart): a pull (cold cache,
   s = 0.3) against a plain parallel download of the same byte ranges with the same worker count and the same
   client library, written to one local file at their offsets (no verification, no variant: the network
   floor); a push to S3 against a plain parallel upload of the same blob sizes (multipart in parts of the
   same size, same workers); a local push against ``cp`` of the base files. Target ≥ 0.8 × the baseline's speed.
3. clients: ranged GETs of one blob in parts with the same workers through each installed client library.
4. load: ``--load-pulls`` concurrent pulls of different sizes, ``--load-pushes`` concurrent pushes of new
   versions and ``gc`` (no grace period) in a loop, on each backend at once; every pull must equal
   materialize byte for byte, every version pushed must be listed and complete, and every blob reachable
   after the run must exist.

Writes bench/results/registry.md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from _servers import serve  # noqa: E402
from registry_servers import S3_ENV  # noqa: E402

from nestprune.build import BuildConfig, build_artifact  # noqa: E402
from nestprune.evaluate.tokenizer import save_tokenizer, train_bpe_tokenizer  # noqa: E402
from nestprune.registry import ChunkCache, list_registry, open_store, push  # noqa: E402
from nestprune.registry.gc import Reachable, gc  # noqa: E402
from nestprune.registry.pull import pull  # noqa: E402
from nestprune.registry.stores import PART_BYTES  # noqa: E402
from nestprune.variant.materialize import materialize  # noqa: E402

SPARSITIES = (0.1, 0.3, 0.5)
TEXT = "\n".join(f"the registry stores layer {i} of the model and a pull reads only what it keeps" for i in range(200))


class RecordingStore:
    """Wraps a store: counts the bytes and requests it returns and records every read (key, start, end) and
    every write (key, size)."""

    def __init__(self, inner):
        self.inner, self.url, self.read_only = inner, inner.url, inner.read_only
        if hasattr(inner, "root"):
            self.root = inner.root
        self.bytes = self.requests = 0
        self.reads: list[tuple[str, int, int | None]] = []
        self.writes: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def _count(self, data: bytes, key: str, start: int = 0, end: int | None = None) -> bytes:
        with self._lock:
            self.bytes += len(data)
            self.requests += 1
            self.reads.append((key, start, end if end is not None else len(data)))
        return data

    def read(self, key):
        return self._count(self.inner.read(key), key)

    def read_range(self, key, start, end):
        return self._count(self.inner.read_range(key, start, end), key, start, end)

    def __getattribute__(self, name):
        if name == "read_range_into" and not hasattr(object.__getattribute__(self, "inner"), name):
            raise AttributeError(name)  # only where the wrapped store reads into buffers (local directories)
        return object.__getattribute__(self, name)

    def read_range_into(self, key, start, into):
        n = self.inner.read_range_into(key, start, into)
        with self._lock:
            self.bytes += n
            self.requests += 1
            self.reads.append((key, start, start + n))
        return n

    def write(self, key, data):
        with self._lock:
            self.writes.append((key, len(data)))
        self.inner.write(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


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


def make_model(work: Path, name: str, dims: tuple[int, ...]) -> tuple[Path, Path]:
    base = make_base(work / f"{name}-base", *dims)
    return base, make_artifact(work, name, base)


def make_artifact(work: Path, name: str, base: Path, seed: int = 0) -> Path:
    (work / "calib.txt").write_text(TEXT)
    return build_artifact(base, work / "calib.txt", work / f"{name}-artifact-{seed}",
                          BuildConfig(method="random", samples=2, seq_len=16, batch_size=2, max_sparsity=0.6, seed=seed))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def same_dir(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


# --- baselines: the same bytes, moved plainly -----------------------------------------------------------------

def plain_download(store, reads: list[tuple[str, int, int | None]], jobs: int, out: Path) -> float:
    """The same byte ranges through the same client, ``jobs`` at a time, into one file at their offsets."""
    offsets, at = [], 0
    for _, a, b in reads:
        offsets.append(at)
        at += (b or 0) - a
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def one(i: int) -> None:
            key, a, b = reads[i]
            data = store.read_range(key, a, b) if b is not None else store.read(key)
            os.pwrite(fd, data, offsets[i])

        t = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, range(len(reads))))
        return time.perf_counter() - t
    finally:
        os.close(fd)
        out.unlink(missing_ok=True)


def plain_upload(client, bucket: str, prefix: str, sizes: list[int], jobs: int, part: int) -> float:
    """Objects of the same sizes, ``jobs`` requests at a time: small ones as one PUT, large ones as multipart
    uploads in parts of ``part`` bytes (all parts of all objects share the worker pool)."""
    payload = memoryview(os.urandom(max(sizes, default=0)))
    singles = [(i, n) for i, n in enumerate(sizes) if n <= part]
    multis = [(i, n) for i, n in enumerate(sizes) if n > part]
    t = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        uploads = {i: client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{i}")["UploadId"] for i, _ in multis}
        work = [pool.submit(client.put_object, Bucket=bucket, Key=f"{prefix}/{i}", Body=bytes(payload[:n]))
                for i, n in singles]
        parts = {i: [pool.submit(client.upload_part, Bucket=bucket, Key=f"{prefix}/{i}", UploadId=uploads[i],
                                 PartNumber=k + 1, Body=bytes(payload[a: a + part]))
                     for k, a in enumerate(range(0, n, part))] for i, n in multis}
        for f in work:
            f.result()
        for i, fs in parts.items():
            client.complete_multipart_upload(Bucket=bucket, Key=f"{prefix}/{i}", UploadId=uploads[i], MultipartUpload={
                "Parts": [{"ETag": f.result()["ETag"], "PartNumber": k + 1} for k, f in enumerate(fs)]})
    return time.perf_counter() - t


# --- client libraries ---------------------------------------------------------------------------------------

def compare_clients(http_url: str, s3_url: str, key: str, size: int, jobs: int) -> list[tuple[str, float]]:
    """MiB/s of ranged GETs of one blob in ``PART_BYTES`` parts, ``jobs`` at a time, per client library."""
    import urllib.request

    ranges = [(a, min(size, a + PART_BYTES)) for a in range(0, size, PART_BYTES)]
    rows = []

    def timed(label: str, get) -> None:
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            with ThreadPoolExecutor(jobs) as pool:
                got = sum(len(d) for d in pool.map(get, ranges))
            best = min(best, time.perf_counter() - t)
            assert got == size, (label, got, size)
        rows.append((label, size / 2**20 / best))

    url = f"{http_url}/{key}"
    import urllib3

    pm = urllib3.PoolManager(maxsize=2 * jobs)
    timed("HTTP urllib3 (connection pool, kept alive) [chosen]",
          lambda r: pm.request("GET", url, headers={"Range": f"bytes={r[0]}-{r[1] - 1}"}).data)

    def fresh(r):
        req = urllib.request.Request(url, headers={"Range": f"bytes={r[0]}-{r[1] - 1}"})
        with urllib.request.urlopen(req) as f:
            return f.read()

    timed("HTTP urllib.request (a new connection per request; before)", fresh)
    try:
        import httpx

        hc = httpx.Client(limits=httpx.Limits(max_connections=2 * jobs))
        timed("HTTP httpx (connection pool)", lambda r: hc.get(url, headers={"Range": f"bytes={r[0]}-{r[1] - 1}"}).content)
    except ImportError:
        pass
    store = open_store(s3_url, jobs=jobs)
    timed("S3 botocore client (urllib3 pool, thread-safe) [chosen]",
          lambda r: store.read_range(key, r[0], r[1]))
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        path = f"{s3_url[len('s3://'):]}/{key}"
        timed("S3 s3fs (aiobotocore, one event loop; before)", lambda r: fs.cat_file(path, start=r[0], end=r[1]))
    except ImportError:
        pass
    return rows


# --- load ---------------------------------------------------------------------------------------------------

def load_test(label: str, write_url: str, read_url: str, base: Path, art: Path, junk_art: Path, expected: dict,
              n_pulls: int, n_pushes: int, work: Path) -> dict:
    from nestprune.registry.gc import remove_version

    first = push(write_url, art, base, name="load", tag="stable").record
    # garbage for gc to find while the storm runs: a version of another ranking, removed again
    junk = push(write_url, junk_art, base, name="load", tag="junk").record
    remove_version(open_store(write_url), "load", junk.digest)
    targets = list(expected)
    cache = ChunkCache(work / f"load-cache-{label}") if not read_url.startswith("/") else None
    stop = threading.Event()
    gcs: list = []

    def one_pull(i: int):
        s, layout = targets[i % len(targets)]
        out = work / f"load-{label}-{i}"
        pull(f"{read_url}/load:stable", out, sparsity=s, layout=layout, cache=cache, jobs=2)
        ok = same_dir(out, expected[s, layout])
        shutil.rmtree(out)
        return ok

    def one_push(i: int):
        return push(write_url, art, base, name="load", tag=f"cb{i}", channel_block=[8, 16, 64, 128, 4, 2][i % 6],
                    jobs=2).record.digest

    def collector():
        while not stop.is_set():
            gcs.append(gc(open_store(write_url), grace_s=0, dry_run=False))
            stop.wait(0.2)

    t = time.perf_counter()
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    try:
        with ThreadPoolExecutor(n_pulls + n_pushes) as pool:
            pulls = [pool.submit(one_pull, i) for i in range(n_pulls)]
            pushes = [pool.submit(one_push, i) for i in range(n_pushes)]
            pulled_ok = [f.result() for f in pulls]
            pushed = [f.result() for f in pushes]
    finally:
        stop.set()
        gc_thread.join()
    secs = time.perf_counter() - t
    store = open_store(write_url)
    listed = {v.digest for v in list_registry(store).models["load"].versions}
    keep = Reachable(store).refresh()
    have = {k.rsplit("/", 1)[-1] for k in store.list("blobs/sha256")}
    versions_ok = set(pushed) | {first.digest} <= listed
    # every version pushed is complete: pull each once more after the storm
    complete = True
    for i in range(n_pushes):
        out = work / f"load-{label}-after-{i}"
        s, layout = targets[0]
        pull(f"{read_url}/load:cb{i}", out, sparsity=s, layout=layout, cache=cache)
        complete &= same_dir(out, expected[s, layout])
        shutil.rmtree(out)
    return dict(backend=label, pulls=n_pulls, pulls_identical=sum(pulled_ok), pushes=n_pushes,
                versions=len(set(pushed)), versions_listed=versions_ok, versions_complete=complete,
                gc_runs=len(gcs), gc_deleted=sum(g.deleted for g in gcs), reachable_missing=len(keep - have),
                seconds=secs)


# --- main ---------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load-pulls", type=int, default=32)
    ap.add_argument("--load-pushes", type=int, default=4)
    ap.add_argument("--sections", default="bytes,speed,clients,load")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "registry.md")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    sections = set(args.sections.split(","))

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.update(S3_ENV)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nestprune-bench-registry."))
    work.mkdir(parents=True, exist_ok=True)
    load_avg = [os.getloadavg()[0]]
    report: dict = {"args": vars(args) | {"out": str(args.out), "workdir": None}}
    try:
        base, art = make_model(work, "main", (args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads,
                                              args.vocab))
        base_bytes = dir_bytes(base)
        print(f"base: {base_bytes / 2**20:.1f} MiB", flush=True)
        mat: dict[float, Path] = {}
        for s in SPARSITIES:
            materialize(art, base, work / f"mat-{s}", sparsity=s)
            mat[s] = work / f"mat-{s}"
        local = work / "registry"
        with serve("s3", "bench") as endpoint, serve("http", str(local)) as http_url:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            backends = {"local": str(local), "s3 (moto)": "s3://bench/registry", "http": http_url}
            for url in (str(local), "s3://bench/registry"):
                push(url, art, base, name="bench", jobs=args.jobs)

            if "bytes" in sections:
                rows = []
                for backend, url in backends.items():
                    for s in SPARSITIES:
                        store = RecordingStore(open_store(url, jobs=args.jobs))
                        out = work / "pull"
                        t = time.perf_counter()
                        pull(f"{url}/bench", out, sparsity=s, cache=ChunkCache(work / f"cache-{backend}-{s}"),
                             store=store, jobs=args.jobs)
                        secs = time.perf_counter() - t
                        assert same_dir(out, mat[s]), (backend, s)
                        rows.append((backend, s, store.bytes, dir_bytes(out), store.requests, secs))
                        print(f"bytes {backend} s={s}: x{store.bytes / dir_bytes(out):.3f}", flush=True)
                        shutil.rmtree(out)
                report["bytes"] = rows
                load_avg.append(os.getloadavg()[0])

            if "speed" in sections:
                speed: dict[str, list[tuple[float, float]]] = {}
                for r in range(args.rounds):
                    for backend in ("s3 (moto)", "http"):
                        url = backends[backend]
                        for cached in (True, False):
                            store = RecordingStore(open_store(url, jobs=args.jobs))
                            out = work / "pull"
                            cache = ChunkCache(work / f"speed-cache-{r}-{backend}") if cached else None
                            t = time.perf_counter()
                            pull(f"{url}/bench", out, sparsity=0.3, cache=cache, store=store, jobs=args.jobs)
                            ours = time.perf_counter() - t
                            assert same_dir(out, mat[0.3])
                            shutil.rmtree(out)
                            plain = plain_download(open_store(url, jobs=args.jobs), store.reads, args.jobs,
                                                   work / "plain.bin")
                            how = "filling the chunk cache (the default)" if cached else "--no-cache"
                            speed.setdefault(f"pull s=0.3 from {backend}, {how}", []).append((plain, ours))
                            print(f"round {r + 1} pull {backend} {how}: nestprune {ours:.2f}s, plain {plain:.2f}s",
                                  flush=True)
                    # push to S3 (a fresh prefix: every blob is new) vs the same sizes uploaded plainly
                    url = f"s3://bench/push-{r}"
                    store = RecordingStore(open_store(url, jobs=args.jobs))
                    t = time.perf_counter()
                    push(None, art, base, name="bench", store=store, jobs=args.jobs)
                    ours = time.perf_counter() - t
                    sizes = [n for k, n in store.writes if k.startswith("blobs/")]
                    plain = plain_upload(open_store(url).client, "bench", f"plain-{r}", sizes, args.jobs, PART_BYTES)
                    speed.setdefault("push to s3 (moto)", []).append((plain, ours))
                    print(f"round {r + 1} push s3: nestprune {ours:.2f}s, plain {plain:.2f}s", flush=True)
                    # local push vs cp of the base files
                    t = time.perf_counter()
                    push(work / f"push-local-{r}", art, base, name="bench", jobs=args.jobs)
                    ours = time.perf_counter() - t
                    (work / "cp").mkdir()
                    t = time.perf_counter()
                    subprocess.run(["cp", *map(str, sorted(base.glob("*.safetensors"))), str(work / "cp")], check=True)
                    plain = time.perf_counter() - t
                    shutil.rmtree(work / "cp")
                    shutil.rmtree(work / f"push-local-{r}")
                    speed.setdefault("push to a local registry (baseline: cp of the base files)", []).append((plain, ours))
                    print(f"round {r + 1} push local: nestprune {ours:.2f}s, cp {plain:.2f}s", flush=True)
                    load_avg.append(os.getloadavg()[0])
                report["speed"] = speed
                report["pulled_bytes"] = dir_bytes(mat[0.3])

            if "clients" in sections:
                from nestprune.registry.versions import parse_reference, read_manifest, resolve

                s = open_store(str(local))
                m = read_manifest(s, resolve(s, parse_reference("bench")).digest)
                big = max(m.tensors.values(), key=lambda e: e.size)
                key = f"blobs/sha256/{big.blob[:2]}/{big.blob}"
                report["clients"] = compare_clients(http_url, "s3://bench/registry", key, big.size, args.jobs)
                report["client_blob"] = big.size
                for label, rate in report["clients"]:
                    print(f"client {label}: {rate:.0f} MiB/s", flush=True)
                load_avg.append(os.getloadavg()[0])

            if "load" in sections:
                ldims = (4, 512, 1408, 8, 4, 8000)
                lbase, lart = make_model(work, "load", ldims)
                ljunk = make_artifact(work, "load", lbase, seed=1)
                expected = {}
                for s in (0.1, 0.2, 0.3, 0.4, 0.5):
                    for layout in ("per-layer", "uniform"):
                        out = work / f"load-mat-{s}-{layout}"
                        materialize(lart, lbase, out, sparsity=s, layout=layout)
                        expected[s, layout] = out
                report["load_model"] = dir_bytes(lbase)
                results = []
                for label, write_url, read_url in (("local", str(work / "load-reg"), str(work / "load-reg")),
                                                   ("s3 (moto)", "s3://bench/load", "s3://bench/load")):
                    results.append(load_test(label, write_url, read_url, lbase, lart, ljunk, expected,
                                             args.load_pulls, args.load_pushes, work))
                    print(json.dumps(results[-1]), flush=True)
                with serve("http", str(work / "load-http")) as lhttp:
                    results.append(load_test("http (pushes and gc on its backing directory)", str(work / "load-http"),
                                             lhttp, lbase, lart, ljunk, expected, args.load_pulls, args.load_pushes,
                                             work))
                    print(json.dumps(results[-1]), flush=True)
                report["load"] = results
                load_avg.append(os.getloadavg()[0])
        report["base_bytes"] = base_bytes
        report["load_avg"] = load_avg
        write_report(args, report)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def write_report(args, r: dict) -> None:
    mib = 2**20
    la = r["load_avg"]
    lines = [
        "# Registry: bytes read, pull and push speed, client libraries, load",
        "",
        f"Command: `python bench/registry_bytes.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"engineers (load average, 1 min, {min(la):.1f} to {max(la):.1f} during the run), CPU only, torch "
        f"{torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.  ",
        f"Model: random bf16 Llama, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {args.heads} "
        f"heads / {args.kv_heads} KV heads, vocab {args.vocab}; base weights {r['base_bytes'] / mib:.1f} MiB. Ranking: "
        "`build --method random` (GQA query mode). Registry chunks: one per head, 32 MLP channels per chunk. "
        f"`--jobs {args.jobs}` for every nestprune transfer and every baseline. The S3 (moto) and HTTP servers run "
        "on 127.0.0.1, each in its own process; the HTTP server is Python's threading static server with Range "
        "support (tests/registry_servers.py). Both servers are pure Python and use a core each while serving: on "
        "this 2-core machine they, not the network, set the pace, for nestprune and the baselines alike.",
        "",
    ]
    if "bytes" in r:
        lines += [
            "## 1. Bytes read per pull",
            "",
            "Cold chunk cache; *read* counts every byte the store returned (manifest, version and tag records, "
            "artifact and tokenizer files, chunks); *variant* is the size of the pulled safetensors, byte-identical "
            "to `nestprune materialize` (checked). Target: read / variant ≤ 1.05.",
            "",
            "| backend | sparsity | read (MiB) | variant (MiB) | read / variant | requests | pull (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, s, read, own, reqs, secs in r["bytes"]:
            lines.append(f"| {backend} | {s:.1f} | {read / mib:.1f} | {own / mib:.1f} | {read / own:.3f} | {reqs} | "
                         f"{secs:.2f} |")
        lines.append("")
    if "speed" in r:
        lines += [
            "## 2. Speed against a plain parallel transfer of the same bytes",
            "",
            f"{args.rounds} rounds; in each, the baseline and nestprune ran seconds apart. *× baseline's speed* = "
            "baseline seconds / nestprune seconds (target ≥ 0.80); the median over rounds counts. Pull baseline: "
            "the byte ranges the pull read, fetched with the same client and worker count into one local file "
            "(no sha256, no variant written, no cache). nestprune's pull also verifies every chunk, writes the "
            "variant and, by default, fills the chunk cache (one file per chunk: as many bytes again, in thousands of "
            "files); `--no-cache` shows the pull without that. Push baseline (S3): objects of the blobs' sizes "
            "uploaded with the same workers, multipart in parts of the same size; nestprune's push also reads the "
            "base, permutes and packs every tensor, hashes every chunk and checks each blob's existence.",
            "",
            "| transfer | median × baseline's speed | rounds (baseline s / nestprune s) |",
            "|---|---|---|",
        ]
        for label, pairs in r["speed"].items():
            ratios = [p / o for p, o in pairs]
            lines.append(f"| {label} | {median(ratios):.2f} | "
                         + ", ".join(f"{p:.2f} / {o:.2f}" for p, o in pairs) + " |")
        lines.append("")
    if "clients" in r:
        lines += [
            "## 3. Client libraries",
            "",
            f"Ranged GETs of one {r['client_blob'] / mib:.1f} MiB blob in parts of {PART_BYTES / mib:.0f} MiB, "
            f"{args.jobs} at a time, best of 2, against the same servers:",
            "",
            "| client | MiB/s |",
            "|---|---|",
        ]
        lines += [f"| {label} | {rate:.0f} |" for label, rate in r["clients"]]
        lines += [
            "",
            "Why these. HTTP: on loopback a new TCP connection costs almost nothing, so `urllib.request` (a new "
            "connection per request, what the HTTP store used before) is no slower here; over a real network every "
            "new connection costs at least a round trip, and a TLS handshake on https, which urllib3's kept-alive, "
            "thread-safe pool avoids — and urllib3 is already installed with botocore and gives the retry code the "
            "raw status, headers and body length. httpx was the slowest here and would be a new dependency. S3: "
            "botocore's client is thread-safe over a urllib3 pool, so ranged reads and multipart parts run on plain "
            "threads next to the writer's jobs, with botocore's own retry mode; s3fs (what the S3 store used before) "
            "funnels every call through one asyncio loop thread on top of aiobotocore (the same botocore "
            "underneath), was slower here, and has no parallel multipart upload of one `pipe_file`. obstore is on "
            "PyPI but was not installed here and was not measured.",
            "",
        ]
    if "load" in r:
        lines += [
            "## 4. Load: concurrent pulls, pushes and gc",
            "",
            f"Model: random bf16 Llama, 4 layers, hidden 512 ({r['load_model'] / mib:.1f} MiB). At once: "
            f"{args.load_pulls} pulls (s = 0.1 … 0.5, per-layer and uniform, 2 jobs each, one shared cache on "
            f"remote backends), {args.load_pushes} pushes of new versions (other chunkings of the same artifact) and "
            "`gc` with no grace period in a loop until they end; before they start, a version of another ranking "
            "is pushed and removed, so gc has garbage to delete (its packs and manifest) while the others run. Then: every version pushed must be listed and pull "
            "correctly, and every blob reachable from a version must exist.",
            "",
            "| backend | pulls identical to materialize | versions pushed / all listed / all complete | gc runs | "
            "blobs gc deleted | reachable blobs missing | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in r["load"]:
            lines.append(f"| {x['backend']} | {x['pulls_identical']} / {x['pulls']} | {x['versions']} / "
                         f"{'yes' if x['versions_listed'] else 'NO'} / {'yes' if x['versions_complete'] else 'NO'} | "
                         f"{x['gc_runs']} | {x['gc_deleted']} | {x['reachable_missing']} | {x['seconds']:.1f} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(json.dumps(r, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
