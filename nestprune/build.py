"""`nestprune build`: rank one model once and write the ranking artifact.

This module only orchestrates: read the architecture, load tokenizer and model (the only place a model
is put on a device), build the objective (``nestprune.objectives``), run the ranking method the config
names (``nestprune.rank.methods``: GISP in ``rank/gisp.py``, the baselines next to it), write the
artifact with its manifest. torch, transformers and zarr are imported where they are used, so that
the command line reads :class:`BuildConfig`'s options without loading them.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestprune import __version__
from nestprune.config import check, option, params
from nestprune.device import DTYPES
from nestprune.errors import NestpruneError
from nestprune.objectives import OBJECTIVES, LmConfig, make_objective
from nestprune.rank.methods import RANKERS, GispConfig, RankJob, RankResult, Reporter, SilentReporter, rank

if TYPE_CHECKING:
    import torch

    from nestprune.arch import ArchInfo
    from nestprune.objectives.base import Objective


@dataclass(frozen=True, init=False)
class BuildConfig:
    """One build: the ranking method (its config), the objective (its config), and the settings every
    method shares. Defaults are the reference's (GISP.md).

    Made from config instances or from the command line's flat options, e.g.
    ``BuildConfig("gisp", steps=8, samples=64)`` is ``BuildConfig(GispConfig(steps=8), LmConfig(samples=64))``.
    A flat option the chosen method or objective does not take is refused; ``objective`` defaults to
    ``lm``, or ``custom`` when ``objective_fn`` is given.
    """

    method: Any = GispConfig()
    objective: Any = LmConfig()
    batch_size: int = option(8, ge=1, help="windows (sequences) per forward/backward")
    seed: int = option(0, help="seed of the calibration sample (and of --method random's draw)")
    max_sparsity: float | None = option(None, gt=0.0, lt=1.0, help="stop once this parameter sparsity is "
                                        "reached (GISP goes past --r-max if needed)")
    gqa_mode: str = option("query", choices=("query", "group"),
                           help="GQA: 'query' prunes query heads (reference), 'group' prunes KV groups")
    skip_first_frac: float = option(0.1, ge=0.0, lt=1.0, help="never prune layers below int(frac*L)")
    skip_last: int = option(1, ge=0, help="never prune this many last layers")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    dtype: str = option("auto", choices=DTYPES, help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")

    def __init__(self, method: str | Any = "gisp", objective: str | Any | None = None, **options: Any):
        shared = {p.key: p for p in params(BuildConfig)}
        method_keys, objective_keys = RANKERS.keys(), OBJECTIVES.keys()
        unknown = sorted(set(options) - set(shared) - method_keys - objective_keys)
        if unknown:
            raise TypeError(f"BuildConfig() got an unexpected option {unknown[0]!r}")
        given = {k: v for k, v in options.items() if v is not None and v is not False}
        if objective is None or (objective == "lm" and "objective_fn" in given):
            objective = "custom" if "objective_fn" in given else "lm"
        object.__setattr__(self, "method", RANKERS.resolve(method, {k: v for k, v in given.items() if k in method_keys}))
        object.__setattr__(self, "objective",
                           OBJECTIVES.resolve(objective, {k: v for k, v in given.items() if k in objective_keys}))
        for key, p in shared.items():
            object.__setattr__(self, p.field, options[key] if options.get(key) is not None else p.default)
        check(self)

    def validate(self) -> None:
        """Check every part again (the config classes check themselves when made)."""
        check(self)
        check(self.method)
        check(self.objective)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_arch(model_dir: Path) -> ArchInfo:
    from nestprune.arch import arch_from_config
    from nestprune.io.fingerprint import config_path
    from nestprune.io.weights import SafetensorsSource

    try:
        config = json.loads(config_path(model_dir).read_text())
    except ValueError as e:
        raise NestpruneError(f"{model_dir}/config.json is not valid JSON ({e})") from None
    with SafetensorsSource(model_dir) as src:
        names = set(src.names())
    arch = arch_from_config(config, names)
    missing = [arch.layer_key(0, s.name) for s in arch.slices() if arch.layer_key(0, s.name) not in names]
    if missing:
        raise NestpruneError(f"{model_dir} lacks tensors its config implies, e.g. {missing[0]}")
    return arch


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise NestpruneError(f"cannot load the tokenizer of {model_dir}: {str(e).splitlines()[0]}") from None


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from nestprune.arch import needs_eager_attention
    from nestprune.io.fingerprint import config_path

    # soft-capped attention (Gemma-2) needs eager: SDPA refuses it (or silently skips the cap)
    attn = "eager" if needs_eager_attention(json.loads(config_path(model_dir).read_text())) else "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn, use_safetensors=True
        )
    except Exception as e:
        raise NestpruneError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Ranking and the whole build
# ---------------------------------------------------------------------------------------------


def rank_model(model: torch.nn.Module, arch: ArchInfo, objective: Objective, cfg: BuildConfig,
               reporter: Reporter | None = None) -> RankResult:
    """Run ``cfg.method`` on a loaded model (GISP zeroes what it removes, in place)."""
    from nestprune.arch import Structures

    job = RankJob(model=model, structures=Structures(arch, cfg.gqa_mode), objective=objective,
                  batch_size=cfg.batch_size, seed=cfg.seed, max_sparsity=cfg.max_sparsity,
                  skip_first_frac=cfg.skip_first_frac, skip_last=cfg.skip_last,
                  reporter=reporter or SilentReporter())
    return rank(cfg.method, job)


def build_artifact(
    model_dir: Path,
    data: Path | None,
    out: Path,
    config: BuildConfig | None = None,
    *,
    objective: Objective | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Build the ranking artifact of ``model_dir`` and write it to ``out`` (atomically).

    The objective is the one ``config.objective`` describes, on ``data``; an ``objective`` instance
    (any object with name/batches/loss/provenance) overrides it.
    """
    import torch

    from nestprune.artifact import prepare_out, write_artifact
    from nestprune.device import device_name, resolve_device, resolve_dtype
    from nestprune.io.fingerprint import fingerprint
    from nestprune.objectives.base import Objective as ObjectiveProtocol

    cfg = config or BuildConfig()
    cfg.validate()
    model_dir, out = Path(model_dir), Path(out)
    prepare_out(out, force, inputs=(model_dir, data))  # before any work: --out may not be an input
    arch = read_arch(model_dir)
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(model_dir)
    objective_config = None
    if objective is None:
        objective, objective_config = make_objective(cfg.objective, data, tokenizer, cfg.seed), cfg.objective
    if not isinstance(objective, ObjectiveProtocol):
        raise NestpruneError(f"objective {objective!r} does not implement batches/loss/provenance")
    fp = fingerprint(model_dir)
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, device, dtype)
    total_params = sum(p.numel() for p in model.parameters())
    result = rank_model(model, arch, objective, cfg, reporter)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    manifest = _manifest(cfg, arch, result, fp, objective, objective_config, total_params,
                         dtype=str(dtype).removeprefix("torch."), device=device_name(device),
                         seconds=time.perf_counter() - started)
    return write_artifact(out, manifest, result.ranking, force=force, inputs=(data,))


def _manifest(cfg: BuildConfig, arch: ArchInfo, result: RankResult, fp: Any, objective: Objective,
              objective_config: Any, total_params: int, *, dtype: str, device: str, seconds: float):
    from nestprune.artifact import arch_summary, ranking_sha256
    from nestprune.config import record
    from nestprune.ranking import RANKING_FIELDS
    from nestprune.schemas.artifact import (
        ArtifactManifest,
        ConfigRecord,
        ObjectiveInfo,
        RankingInfo,
        ScheduleInfo,
    )

    ranking = result.ranking
    return ArtifactManifest(
        nestprune_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        base=fp,
        arch=arch_summary(arch, ranking.decoder_params, total_params),
        objective=ObjectiveInfo(name=objective.name, provenance=objective.provenance(),
                                config=ConfigRecord(**record(objective_config)) if objective_config else None),
        schedule=ScheduleInfo(
            method=cfg.method.name, iterative=result.iterative, r_max=result.r_max,
            steps_planned=result.steps_planned, steps_run=len(result.trajectory), ratio_step=result.ratio_step,
            max_sparsity_requested=cfg.max_sparsity, normalisation=result.normalisation, gqa_mode=cfg.gqa_mode,
            skip_first_frac=cfg.skip_first_frac, skip_last=cfg.skip_last,
            prunable_layers=arch.prunable_layers(cfg.skip_first_frac, cfg.skip_last),
            batch_size=cfg.batch_size, dtype=dtype, seed=cfg.seed,
            method_config=ConfigRecord(**record(cfg.method)),
        ),
        trajectory=result.trajectory,
        ranking=RankingInfo(num_structures=len(ranking), num_removed=ranking.num_removed,
                            max_sparsity=ranking.max_sparsity, fields=list(RANKING_FIELDS),
                            sha256=ranking_sha256(ranking)),
        device=device,
        total_seconds=seconds,
    )

