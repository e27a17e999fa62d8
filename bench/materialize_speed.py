"""Materializing a variant, and pulling it from a local registry, against ``cp`` of the base's safetensors files:
time ratio and peak memory; and every command's startup against ``python -c "import torch"``.

    python bench/materialize_speed.py [--layers 16 --hidden 2048 --heads 16 --kv-heads 4
                                       --intermediate 5632 --vocab 32000 --repeats 5] [--before DIR]

Writes a random fp16 Llama (GQA) of the given shape straight to safetensors shards (~1.7 GB by default,
never instantiating a model), a random-order artifact for it (the writer's cost does not depend on
which order), pushes both to a local registry (untimed), then runs, each in a fresh subprocess so its
peak RSS is its own, in rounds — one ``cp`` and one of every case per round, so every ratio compares
runs made seconds apart on this shared machine:

* ``cp``           ``cp`` of every safetensors file (the floor any materializer competes with);
* ``materialize``  ``nestprune.variant.materialize.materialize`` end to end — artifact read, fingerprint check,
                   plan, streaming slice-and-write, config/tokenizer/manifest — per-layer and uniform;
* ``pull``         ``nestprune.registry.pull.pull`` from the local registry (every chunk read and sha256-checked).

Files are in the page cache for every run (they were just written), so this compares CPU + write cost,
not cold-disk reads; ``sync`` runs (untimed) before each run so none pays for another's writeback.
``--before DIR`` (a source tree of older nestprune code, e.g. ``git archive main | tar -x -C DIR``) adds every
case and the materialize / pull startup run with that code, in the same rounds: before and after side by side.
Writes a Markdown table (``--out``, default bench/results/materialize.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("NESTPRUNE_BENCH_SRC") or ROOT)  # the code a child measures (``--before``: older code)
sys.path.insert(0, str(SRC))

CASES = (  # (label, operation, sparsity, layout, multiple_of)
    ("materialize per-layer s=0.3", "materialize", 0.3, "per-layer", None),
    ("materialize per-layer s=0.5", "materialize", 0.5, "per-layer", None),
    ("materialize uniform s=0.3, multiple of 128", "materialize", 0.3, "uniform", 128),
    ("pull per-layer s=0.3 from a local registry", "pull", 0.3, "per-layer", None),
    ("pull uniform s=0.3, multiple of 128, from a local registry", "pull", 0.3, "uniform", 128),
)
NOTES = (
    "## Notes",
    "",
    "How the writer spends its time (``nestprune.variant.hf``, ``nestprune.registry.source``): every byte of the "
    "base is hashed once, from a mapping of the page cache, by the same job that then writes that block's kept "
    "rows straight from the mapping (``pwritev``) — the default content check costs no second read; columns "
    "(o_proj, down_proj) are gathered by numpy into a reused buffer. A local-registry pull checks every chunk's "
    "sha256 and writes straight from the mapped blobs. What remains is the work itself: one kernel copy per kept "
    "byte, the hash of every base byte (XXH3; SHA-256 of every kept chunk for a pull, about 1.3 GB/s per core "
    "here), the element gathers of down_proj's kept columns and the transposes of a pull's o_proj / down_proj.",
    "",
    "Two properties of these virtual machines shaped the writer (measured while developing it, not by this "
    "script): a `pwrite` of 16 MiB at once, or from a buffer on transparent huge pages, cost 1.5–2.3 CPU s per "
    "496 MB where 1 MiB writes from small pages cost 0.15–0.26; so every write is cut into 1 MiB calls and every "
    "buffer is mapped with MADV_NOHUGEPAGE (``nestprune.io.buffers``). Two threads writing one file made the "
    "kernel spin on the file's lock; writes to one file now take turns on a lock in Python, where waiting sleeps.",
)
STARTUP = (  # (label, argv after `python`)
    ('python -c "import torch"', ["-c", "import torch"]),
    ("nestprune --help", ["-m", "nestprune", "--help"]),
)


# --- the random base model and artifact ---------------------------------------------------------------------

def write_base(model_dir: Path, a: argparse.Namespace, shard_bytes: int = 500 * 1024**2) -> None:
    """A random fp16 Llama written shard by shard (peak memory: one shard)."""
    import torch
    from safetensors.torch import save_file

    d, hd = a.hidden, a.hidden // a.heads
    shapes = {"model.embed_tokens.weight": (a.vocab, d)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (a.heads * hd, d), p + "self_attn.k_proj.weight": (a.kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (a.kv_heads * hd, d), p + "self_attn.o_proj.weight": (d, a.heads * hd),
            p + "mlp.gate_proj.weight": (a.intermediate, d), p + "mlp.up_proj.weight": (a.intermediate, d),
            p + "mlp.down_proj.weight": (d, a.intermediate),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        }
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (a.vocab, d)}
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = None  # type: ignore[assignment]
        size += n
    files = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {}
    for fname, names in zip(files, shards, strict=True):
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).half() for n in names}
        save_file(tensors, str(model_dir / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in names}
        del tensors
    index = {"metadata": {"total_size": sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())},
             "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
        "intermediate_size": a.intermediate, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "head_dim": hd, "vocab_size": a.vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}))


def write_random_artifact(model_dir: Path, out: Path) -> None:
    """A random removal order over every structure (prunable layers first), written as a real artifact."""
    import numpy as np

    from nestprune.arch import KIND_CODES, Structures, arch_from_config
    from nestprune.artifact import arch_summary, ranking_sha256, write_artifact
    from nestprune.io.fingerprint import fingerprint
    from nestprune.io.weights import SafetensorsSource
    from nestprune.ranking import RANKING_FIELDS, Ranking
    from nestprune.schemas.artifact import ArtifactManifest, ObjectiveInfo, RankingInfo, ScheduleInfo

    cfg = json.loads((model_dir / "config.json").read_text())
    with SafetensorsSource(model_dir) as src:
        names = set(src.names())
        numel = {n: int(np.prod(src.shape(n))) for n in names}
    arch = arch_from_config(cfg, names)
    decoder = sum(v for k, v in numel.items() if k.startswith("model.layers."))
    prunable_layers = arch.prunable_layers()
    rng = np.random.default_rng(0)
    kinds = [(Structures(arch, "query").attention_kind, arch.num_heads), ("channel", arch.intermediate_size)]
    rows = [(layer, k, i) for layer in range(arch.num_layers) for k, n in kinds for i in range(n)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    rows.sort(key=lambda r: r[0] not in prunable_layers)
    prunable = np.array([r[0] in prunable_layers for r in rows])
    cost = np.array([arch.structure_cost(r[1]) for r in rows], np.int64)
    # the schedule "removed" prunable structures up to ~60% parameter sparsity
    removed = prunable & (np.cumsum(cost * prunable) <= 0.6 * decoder)
    ranking = Ranking(
        structures=Structures(arch, "query"), decoder_params=decoder,
        layer=np.array([r[0] for r in rows], np.int32), kind=np.array([KIND_CODES[r[1]] for r in rows], np.uint8),
        index=np.array([r[2] for r in rows], np.int32), step=np.where(removed, 0, -1).astype(np.int32),
        score=rng.random(len(rows)), raw_score=rng.random(len(rows)), cost=cost, prunable=prunable,
    )
    manifest = ArtifactManifest(
        nestprune_version="bench", created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        base=fingerprint(model_dir), arch=arch_summary(arch, decoder, sum(numel.values())),
        objective=ObjectiveInfo(name="random", provenance={}),
        schedule=ScheduleInfo(method="random", iterative=False, r_max=0.7, steps_planned=1, steps_run=1,
                              ratio_step=0.0, normalisation="reference", gqa_mode="query", skip_first_frac=0.1,
                              skip_last=1, prunable_layers=prunable_layers, batch_size=1, dtype="float16", seed=0),
        trajectory=[], device="cpu", total_seconds=0.0,
        ranking=RankingInfo(num_structures=len(ranking), num_removed=ranking.num_removed,
                            max_sparsity=ranking.max_sparsity, fields=list(RANKING_FIELDS),
                            sha256=ranking_sha256(ranking)),
    )
    write_artifact(out, manifest, ranking)


# --- one measured operation per subprocess ------------------------------------------------------------------

def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Samples RssAnon (memory the process itself holds, not mapped file pages) every few ms; keeps the max."""

    def __init__(self, every_s: float = 0.005):
        self.peak, self.every_s, self._stop = 0.0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __enter__(self) -> AnonPeak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def child(op: str, args: list[str]) -> None:
    """Run one operation; print {"seconds", "max_rss_mb", "bytes", …} as JSON on the last line."""
    import torch  # noqa: F401  (imports are not part of the timing)

    from nestprune.variant.materialize import materialize

    rss_before = peak_rss_mb()
    anon_before = AnonPeak()
    anon_before._sample()
    anon = AnonPeak().__enter__()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if op == "idle":
        written = 0
    elif op == "copy":
        base, out = Path(args[0]), Path(args[1])
        out.mkdir()
        subprocess.run(["cp", *map(str, sorted(base.glob("*.safetensors"))), str(out)], check=True)
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    elif op == "materialize":
        art, base, out, sparsity, layout, mult = args
        materialize(Path(art), Path(base), Path(out), sparsity=float(sparsity), layout=layout,
                    multiple_of=int(mult) if mult != "none" else None)
        written = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    else:
        from nestprune.registry.pull import pull

        ref, out, sparsity, layout, mult = args
        pull(ref, Path(out), sparsity=float(sparsity), layout=layout,
             multiple_of=int(mult) if mult != "none" else None, cache=None)
        written = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    anon.__exit__()
    rss = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "max_rss_mb": rss, "rss_after_imports_mb": rss_before, "bytes": written,
                      "anon_peak_mb": anon.peak, "anon_after_imports_mb": anon_before.peak, "cpu_s": cpu}))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (``cp``)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def code_env(src: Path | None) -> dict[str, str]:
    """The environment of a child measuring the code in ``src`` (None: this tree)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if src is not None:
        env["NESTPRUNE_BENCH_SRC"] = str(src)
        env["PYTHONPATH"] = str(src)
    return env


def measure(op: str, *args: str, src: Path | None = None) -> dict:
    os.sync()  # every run starts with no dirty pages left by the previous one (untimed)
    res = subprocess.run([sys.executable, __file__, "--child", op, *args], capture_output=True, text=True,
                         env=code_env(src))
    if res.returncode:
        raise SystemExit(f"{op} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def once(op: str, out: Path, *args: str, src: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = measure(op, *args, src=src)
    shutil.rmtree(out, ignore_errors=True)
    return r


def startup_seconds(argv: list[str], repeats: int, src: Path | None = None) -> tuple[float, float]:
    """Best wall time and best CPU time (user + sys) of ``python argv`` (a whole process: interpreter, imports,
    the command, the exit)."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, capture_output=True, cwd=src or ROOT, env=code_env(src))
        best = min(best, time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        best_cpu = min(best_cpu, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return best, best_cpu


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def device_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "materialize.md")
    p.add_argument("--before", type=Path, default=None,
                   help="a source tree of older nestprune code to measure in the same rounds")
    a = p.parse_args()
    versions = [("", None)] + ([("before: ", a.before.resolve())] if a.before else [])

    work = Path(tempfile.mkdtemp(prefix="nestprune-bench-"))
    load = [os.getloadavg()[0]]
    try:
        base, art, reg = work / "base", work / "artifact", work / "registry"
        base.mkdir()
        t0 = time.perf_counter()
        write_base(base, a)
        write_random_artifact(base, art)
        from nestprune.registry import push

        push(reg, art, base, name="bench")
        base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"base: {base_bytes / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards "
              f"(made and pushed in {time.perf_counter() - t0:.0f}s)", flush=True)
        idle = measure("idle")
        copies: list[dict] = []
        runs: dict[str, list[dict]] = {tag + label: [] for label, *_ in CASES for tag, _ in versions}
        for rnd in range(a.repeats):
            copies.append(once("copy", work / "copy", str(base), str(work / "copy")))
            for label, op, s, layout, mult in CASES:
                for tag, src in versions:
                    out = work / "variant"
                    args = ((str(art), str(base)) if op == "materialize" else (f"{reg}/bench",)) + (
                        str(out), str(s), layout, str(mult or "none"))
                    r = once(op, out, *args, src=src)
                    r["ratio"] = copies[-1]["seconds"] / r["seconds"]
                    runs[tag + label].append(r)
                    print(f"round {rnd + 1}: {tag}{label}: {r['seconds']:.2f}s, cp {copies[-1]['seconds']:.2f}s, "
                          f"{r['ratio']:.2f}x cp's speed, {r['cpu_s']:.2f} CPU s", flush=True)
            load.append(os.getloadavg()[0])
        # startup: a tiny model, so the command's own work is negligible next to its imports
        tiny = argparse.Namespace(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256)
        tbase, tart, treg = work / "tiny", work / "tiny-art", work / "tiny-reg"
        tbase.mkdir()
        write_base(tbase, tiny)
        write_random_artifact(tbase, tart)
        push(treg, tart, tbase, name="tiny")
        startup = [(label, startup_seconds(argv, a.repeats)) for label, argv in STARTUP]
        for label, argv in (
            ("nestprune materialize (tiny model)", ["-m", "nestprune", "materialize", str(tart), "--base", str(tbase),
                                                    "--out", str(work / "t-out"), "--sparsity", "0.3", "--force"]),
            ("nestprune pull (tiny model, local registry)", ["-m", "nestprune", "pull", f"{treg}/tiny", "--out",
                                                             str(work / "t-pull"), "--sparsity", "0.3", "--force"]),
            ("nestprune list (local registry)", ["-m", "nestprune", "list", str(treg)]),
            ("nestprune gc (dry run, local registry)", ["-m", "nestprune", "gc", str(treg)]),
            ("nestprune inspect (artifact)", ["-m", "nestprune", "inspect", str(tart)]),
        ):
            for tag, src in versions:
                if tag and label.split()[1] not in ("materialize", "pull"):
                    continue
                startup.append((tag + label, startup_seconds(argv, a.repeats, src)))
        for label, (secs, cpu) in startup:
            print(f"startup {label}: {secs:.2f}s, {cpu:.2f} CPU s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cmd = "python bench/materialize_speed.py " + " ".join(sys.argv[1:])
    lines = [
        "# materialize and local-registry pull vs `cp` of the safetensors files",
        "",
        f"Command: `{cmd.strip()}` (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})  ",
        f"Device: {device_line()}  ",
        f"Date: {_dt.date.today().isoformat()}; {a.repeats} rounds, each one `cp` then every case, every run in a "
        f"fresh process. Load average (1 min) during the run: {min(load):.1f} to {max(load):.1f} on "
        f"{os.cpu_count()} cores shared with other engineers.",
        "",
        f"Base: random fp16 Llama, {a.layers} layers, hidden {a.hidden}, {a.heads} heads / {a.kv_heads} KV heads, "
        f"intermediate {a.intermediate}, vocab {a.vocab}: {base_bytes / 1e9:.2f} GB of safetensors. Artifact: a "
        "random removal order (GQA query-head mode). All files in the page cache (warm reads); a cold disk would "
        "add the read time of what each operation reads. `sync` before every run (untimed).",
        "",
        "*× cp's speed* = seconds of the `cp` in the same round / seconds of the operation (1.00 = as fast as "
        "copying the whole base; target ≥ 0.80); the median over rounds is the figure that counts, the best and "
        "worst rounds show the spread on this shared machine. *CPU s* is the CPU time the operation used (its "
        "threads and, for `cp`, the child process), which other jobs on the machine disturb far less than wall "
        "time. Target peak RSS ≤ 2 GiB.",
        "",
        "| operation | median × cp's speed | best / worst round | best s | median CPU s (user + sys) | written GB | peak RSS MB | peak anonymous MB above imports |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("cp safetensors files", copies)] + list(runs.items())
    for label, rs in rows:
        ratios = [r.get("ratio", 1.0) for r in rs]
        best = min(rs, key=lambda r: r["seconds"])
        lines.append(
            f"| {label} | {median(ratios):.2f} | {max(ratios):.2f} / {min(ratios):.2f} | {best['seconds']:.2f} | "
            f"{median([r.get('cpu_s', float('nan')) for r in rs]):.2f} | {best['bytes'] / 1e9:.2f} | {max(r['max_rss_mb'] for r in rs):.0f} | "
            f"{max(r['anon_peak_mb'] - r['anon_after_imports_mb'] for r in rs):.0f} |")
    torch_s, torch_cpu = startup[0][1]
    lines += [
        "",
        f"Peak RSS (VmHWM, the maximum over rounds) includes the ~{idle['max_rss_mb']:.0f} MB of a process that only "
        "imports torch and nestprune, and page-cache pages of files while they are mapped. The last column is what "
        "the operation itself allocates: the peak of RssAnon (sampled every 5 ms) minus its value after the imports. "
        f"The largest single tensor here is {a.vocab * a.hidden * 2 / 1e6:.0f} MB (embeddings / lm_head).",
        "",
        "## Startup",
        "",
        "Wall time and CPU time of the whole process (interpreter, imports, the command, the exit; best of the "
        "rounds), on a tiny model so the work itself is negligible. Target: `materialize` and `pull` within 1 s of "
        "`python -c \"import torch\"`.",
        "",
        "| command | seconds | − import torch | CPU s | − import torch (CPU) |",
        "|---|---|---|---|---|",
    ]
    for label, (secs, cpu) in startup:
        lines.append(f"| {label} | {secs:.2f} | {secs - torch_s:+.2f} | {cpu:.2f} | {cpu - torch_cpu:+.2f} |")
    lines += ["", *NOTES, ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
