"""What the default base check costs: the content fingerprint against materialize's own work.

    python bench/fingerprint_cost.py [--layers 9 --hidden 2048 --heads 16 --kv-heads 4
                                      --intermediate 5632 --vocab 32000 --repeats 3]

Writes a random fp16 Llama (~1.1 GB of safetensors by default; ``materialize_speed.write_base``) and a
random-order artifact for it, then times, each in a fresh subprocess, with the base files in the page cache
(``warm``) and evicted from it before the run (``cold``, ``posix_fadvise(DONTNEED)`` on every base file):

* ``read``         reading every base file once (the I/O floor of any check that sees every byte);
* ``content``      ``io.fingerprint.check_content``: the default check (XXH3-128 over every byte of every tensor);
* ``sha256``       ``check_fingerprint(full=True)``: ``--full-check`` (sha256 of every file);
* ``materialize``  ``materialize(..., sparsity=0.3)`` end to end, with the default check;
* ``materialize, old check``  the same with the base checked as before this check existed (config, file
                   names and sizes): what the default check adds is the difference.

Writes a Markdown table (``--out``, default bench/results/fingerprint.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from materialize_speed import device_line, write_base, write_random_artifact  # noqa: E402

SHAPE = {"--layers": 9, "--hidden": 2048, "--heads": 16, "--kv-heads": 4, "--intermediate": 5632, "--vocab": 32000,
         "--repeats": 5}
OPS = ("read", "content", "sha256", "materialize", "materialize-old-check")
LABELS = {"read": "read every base file", "content": "content fingerprint check (default)",
          "sha256": "sha256 of every file (--full-check)", "materialize": "materialize s=0.3 (default check)",
          "materialize-old-check": "materialize s=0.3, old check (names and sizes)"}


NOTE = ("The check reads every byte of every tensor with four parallel reads and hashes it with XXH3-128; "
        "warm, it costs about one read of the base from the page cache; cold, it is the read materialize would "
        "otherwise do itself through page faults and in-kernel copies, done in parallel first, so materialize then "
        "finds the base in the page cache (on this virtual disk parallel reads are about three times faster than "
        "one sequential reader, which is why the cold materialize with the check is faster than without).")


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages of files nobody maps)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(op: str, art: str, base: str, out: str) -> None:
    import torch  # noqa: F401  (imports are not part of the timing)

    from nestprune.artifact import read_manifest
    from nestprune.io import fingerprint as fp
    from nestprune.variant import materialize as mat

    manifest = read_manifest(Path(art))
    t0 = time.perf_counter()
    if op == "read":
        for f in sorted(Path(base).glob("*.safetensors")):
            with open(f, "rb") as h:
                while h.read(16 << 20):
                    pass
    elif op == "content":
        fp.check_content(Path(base), manifest.base.content)
    elif op == "sha256":
        fp.check_fingerprint(Path(base), manifest.base, full=True)
    else:
        if op == "materialize-old-check":
            check = fp.check_fingerprint

            def old_check(model_dir, expected, full=False):  # config sha256, file names and sizes
                return check(model_dir, expected.model_copy(update={"content": None}), full)

            fp.check_fingerprint = old_check  # type: ignore[assignment]
        mat.materialize(Path(art), Path(base), Path(out), sparsity=0.3)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def measure(op: str, art: Path, base: Path, out: Path, cold: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cold:
        evict(sorted(base.glob("*.safetensors")))
    res = subprocess.run([sys.executable, __file__, "--child", op, str(art), str(base), str(out)],
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if res.returncode:
        raise SystemExit(f"{op} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in SHAPE.items():
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fingerprint.md")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nestprune-bench-"))
    results: dict[tuple[str, bool], float] = {}
    medians: dict[tuple[str, bool], float] = {}
    try:
        base, art = work / "base", work / "artifact"
        base.mkdir()
        write_base(base, a)
        write_random_artifact(base, art)
        base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"base: {base_bytes / 1e9:.2f} GB", flush=True)
        runs: dict[tuple[str, bool], list[float]] = {}
        for _ in range(a.repeats):  # interleaved, so that a busy moment of the shared machine hits every operation
            for cold in (False, True):
                for op in OPS:
                    runs.setdefault((op, cold), []).append(measure(op, art, base, work / "variant", cold))
        for (op, cold), times in runs.items():
            results[(op, cold)] = min(times)
            medians[(op, cold)] = statistics.median(times)
            print(f"{'cold' if cold else 'warm'} {op}: best {min(times):.2f}s, median {medians[(op, cold)]:.2f}s "
                  f"(runs: {', '.join(f'{r:.2f}' for r in times)})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cmd = "python bench/fingerprint_cost.py " + " ".join(sys.argv[1:])
    lines = [
        "# The default base check (content fingerprint) against materialize's own work",
        "",
        f"Command: `{cmd.strip()}` (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})  ",
        f"Device: {device_line()}  ",
        f"Date: {_dt.date.today().isoformat()}, {a.repeats} run(s) of each, interleaved, every run in a fresh process.",
        "",
        f"Base: random fp16 Llama, {a.layers} layers, hidden {a.hidden}, {a.heads} heads / {a.kv_heads} KV heads, "
        f"intermediate {a.intermediate}, vocab {a.vocab}: {base_bytes / 1e9:.2f} GB of safetensors. warm: the base "
        "in the page cache; cold: its pages evicted before the run (posix_fadvise DONTNEED), read from the disk. "
        "The machine is shared: times vary run to run; the best and the median run of each are reported.",
        "",
        "| operation | warm s (best / median) | base GB/s | cold s (best / median) | base GB/s |",
        "|---|---|---|---|---|",
    ]
    for op in OPS:
        w, c = results[(op, False)], results[(op, True)]
        lines.append(f"| {LABELS[op]} | {w:.2f} / {medians[(op, False)]:.2f} | {base_bytes / 1e9 / w:.2f} | "
                     f"{c:.2f} / {medians[(op, True)]:.2f} | {base_bytes / 1e9 / c:.2f} |")
    lines += ["", "Medians:"]
    for cold in (False, True):
        new, old = medians[("materialize", cold)], medians[("materialize-old-check", cold)]
        lines.append(f"- {'cold' if cold else 'warm'}: materialize with the default check takes {new:.2f} s, with the "
                     f"old check {old:.2f} s ({new - old:+.2f} s, {new / old:.2f}x); the check alone takes "
                     f"{medians[('content', cold)]:.2f} s, {medians[('content', cold)] / medians[('sha256', cold)]:.2f}x "
                     f"the time of --full-check and {medians[('content', cold)] / medians[('read', cold)]:.2f}x the "
                     "time of one plain read of the files.")
    lines += ["", NOTE, ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
