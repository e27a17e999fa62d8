"""Run by tests/test_distributed.py under torchrun (gloo, CPU): several builds in one launch, each rank's outcome
written as JSON; and ``failing``, an objective for ``--objective-fn`` that fails on rank 1 only.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py SPEC.json OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def _calibration(tokenizer, data_path: Path, samples: int, seq_len: int):
    from nestprune.objectives.lm import LanguageModeling
    from nestprune.rank.calibration import load_calibration

    return LanguageModeling(load_calibration(data_path, tokenizer, samples, seq_len, 0))


class FailsOnRank1:
    """The LM objective, except that rank 1's second micro-batch raises (an out-of-memory, a bad disk)."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def batches(self, batch_size: int):
        return self.inner.batches(batch_size)

    def loss(self, model, batch):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 2:
            raise RuntimeError("boom on rank 1")
        return self.inner.loss(model, batch)

    def provenance(self):
        return self.inner.provenance()


class DiffersByRank(FailsOnRank1):
    """The LM objective with a provenance that names the rank: the ranks' inputs differ."""

    def loss(self, model, batch):
        return self.inner.loss(model, batch)

    def provenance(self):
        return {**self.inner.provenance(), "rank": os.environ.get("RANK")}


def failing(tokenizer, data_path, options):
    """``--objective-fn tests/distributed_worker.py:failing``."""
    return FailsOnRank1(_calibration(tokenizer, Path(data_path), int(options.get("samples", 4)),
                                     int(options.get("seq_len", 16))))


def command_line(argv: list[str]) -> dict:
    import contextlib
    import io

    from nestprune.cli.main import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = app(args=argv, prog_name="nestprune", standalone_mode=False)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(spec_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from nestprune.artifact import read_manifest
    from nestprune.build import BuildConfig, build_artifact, load_tokenizer
    from nestprune.errors import NestpruneError

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")  # once for every case: build_artifact uses the group that is open
    results = []
    for case in spec["cases"]:
        if "argv" in case:  # the command line, in this process: its status and what this rank printed
            results.append({"name": case["name"], **command_line(case["argv"])})
            continue
        model_dir, data = Path(case["model"]), Path(case["data"])
        objective = None
        if case.get("objective"):
            inner = _calibration(load_tokenizer(model_dir), data, case["options"]["samples"],
                                 case["options"]["seq_len"])
            objective = {"failing": FailsOnRank1, "differs": DiffersByRank, "plain": lambda x: x}[case["objective"]](inner)
        from nestprune.resume import resume_dir

        kept = (resume_dir(out / case.get("out", case["name"])) / "checkpoint.json").exists()
        try:
            path = build_artifact(model_dir, data, out / case.get("out", case["name"]), BuildConfig(**case["options"]),
                                  objective=objective, resume=case.get("resume", False))
            results.append({"name": case["name"], "ok": True, "checkpoint_before": kept,
                            "sha256": read_manifest(path).ranking.sha256 if rank == 0 else None})
        except Exception as e:
            results.append({"name": case["name"], "ok": False, "error": type(e).__name__, "message": str(e),
                            "code": e.exit_code if isinstance(e, NestpruneError) else None})
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
