"""Base-model fingerprint: sha256 of config.json and of every safetensors weight file."""

from __future__ import annotations

from pathlib import Path

from nestprune.errors import NestpruneError
from nestprune.io.text import sha256_file
from nestprune.io.weights import weight_files
from nestprune.schemas.artifact import BaseFingerprint, FileDigest


def config_path(model_dir: Path) -> Path:
    if not Path(model_dir).is_dir():
        raise NestpruneError(f"model directory {model_dir} does not exist")
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise NestpruneError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    return p


def fingerprint(model_dir: Path) -> BaseFingerprint:
    model_dir = Path(model_dir)
    files = [FileDigest(name=f.name, size=f.stat().st_size, sha256=sha256_file(f)) for f in weight_files(model_dir)]
    return BaseFingerprint(path=str(model_dir), config_sha256=sha256_file(config_path(model_dir)), files=files)


def check_fingerprint(model_dir: Path, expected: BaseFingerprint, full: bool = False) -> None:
    """Fast check (config sha256, file names and sizes) or, with ``full``, every file's sha256."""
    model_dir = Path(model_dir)
    if sha256_file(config_path(model_dir)) != expected.config_sha256:
        raise NestpruneError(f"{model_dir} is not the model this artifact was built from (config.json differs)")
    have = {f.name: f for f in weight_files(model_dir)}
    want = {f.name: f for f in expected.files}
    if set(have) != set(want):
        raise NestpruneError(
            f"{model_dir} is not the model this artifact was built from (weight files differ: "
            f"expected {', '.join(sorted(want))}, found {', '.join(sorted(have))})"
        )
    for name, f in want.items():
        if have[name].stat().st_size != f.size:
            raise NestpruneError(f"{model_dir} is not the model this artifact was built from ({name} differs in size)")
        if full and sha256_file(have[name]) != f.sha256:
            raise NestpruneError(f"{model_dir} is not the model this artifact was built from ({name} sha256 differs)")
