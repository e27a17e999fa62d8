"""`nestprune build`: run GISP (or a baseline) once on a model and write the ranking artifact.

This is the only module that places a model on a device. The math it ties together is pure:
score.py (per-structure scores), schedule.py (global threshold), mask.py (zeroing removed
structures); the objective (objective.py) says what the gradient is the gradient of.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nestprune import __version__
from nestprune.arch import (
    ArchInfo,
    GqaMode,
    Structures,
    arch_from_config,
    decoder_param_count,
    needs_eager_attention,
)
from nestprune.artifact import arch_summary, prepare_out, ranking_sha256, write_artifact
from nestprune.device import resolve_device, resolve_dtype
from nestprune.errors import NestpruneError
from nestprune.io.fingerprint import config_path, fingerprint
from nestprune.io.weights import SafetensorsSource
from nestprune.objectives.base import LanguageModeling, Objective
from nestprune.rank.calibration import load_calibration
from nestprune.rank.mask import layer_tensors, zero_removed_
from nestprune.rank.schedule import order_within_step, ratio_step, select_pruned
from nestprune.rank.score import layer_scores, normalise
from nestprune.ranking import RANKING_FIELDS, Ranking, StructureTable, structure_table
from nestprune.schemas.artifact import ArtifactManifest, ObjectiveInfo, RankingInfo, ScheduleInfo, StepRecord

METHODS = ("gisp", "gisp-oneshot", "wanda-sp", "magnitude", "random")


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build. Defaults are the reference's (GISP.md), steps scaled with depth."""

    method: str = "gisp"
    samples: int = 2000  # calibration windows
    seq_len: int = 256  # tokens per window
    batch_size: int = 8
    seed: int = 0
    r_max: float = 0.7  # final structure ratio of the schedule
    steps: int | None = None  # None: 3.5 per layer (112 for 32 layers), at least 16
    max_sparsity: float | None = None  # stop once this parameter sparsity is reached (extends past r_max)
    gqa_mode: GqaMode = "query"
    normalisation: str = "reference"
    skip_first_frac: float = 0.1
    skip_last: int = 1
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (self.samples >= 1, "--samples must be at least 1"),
            (self.seq_len >= 2, "--seq-len must be at least 2"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (0.0 < self.r_max <= 1.0, "--r-max must be in (0, 1]"),
            (self.steps is None or self.steps >= 1, "--steps must be at least 1"),
            (self.max_sparsity is None or 0.0 < self.max_sparsity < 1.0, "--max-sparsity must be in (0, 1)"),
            (self.gqa_mode in ("query", "group"), "--gqa-mode must be 'query' or 'group'"),
            (self.normalisation in ("reference", "none"), "--normalisation must be 'reference' or 'none'"),
            (0.0 <= self.skip_first_frac < 1.0, "--skip-first-frac must be in [0, 1)"),
            (self.skip_last >= 0, "--skip-last must be >= 0"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "--dtype must be auto, float32, bfloat16 or float16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise NestpruneError(msg)

    def steps_for(self, num_layers: int) -> int:
        if self.method == "gisp-oneshot":
            return 1
        return self.steps if self.steps is not None else max(16, round(3.5 * num_layers))


class Reporter(Protocol):
    def on_batch(self, step: int, done: int, total: int) -> None: ...

    def on_step(self, record: StepRecord, steps_planned: int) -> None: ...


class SilentReporter:
    def on_batch(self, step: int, done: int, total: int) -> None:
        pass

    def on_step(self, record: StepRecord, steps_planned: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def accumulate_gradients(
    model: torch.nn.Module,
    objective: Objective,
    params: dict[str, torch.nn.Parameter],
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """One full pass over the objective's batches: (objective value, its gradient for ``params`` in fp32).

    Only ``params`` require gradients; everything else is frozen. fp32 parameters accumulate in
    ``.grad``; lower-precision ones are added into fp32 buffers by a hook the moment each gradient is
    ready (and their ``.grad`` dropped), so many batches lose no bits and no full set of bf16
    gradients is ever held at once.
    """
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    acc: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(buf: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            buf.add_(p.grad.float())
            p.grad = None

        return hook

    for name, p in params.items():
        p.requires_grad_(True)
        if p.dtype != torch.float32:
            acc[name] = torch.zeros_like(p, dtype=torch.float32)
            hooks.append(p.register_post_accumulate_grad_hook(make_hook(acc[name])))
    batches = list(objective.batches(batch_size))
    total = 0.0
    try:
        for i, batch in enumerate(batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss = objective.loss(model, batch)
            loss.backward()
            total += float(loss.detach())
            if on_batch:
                on_batch(i + 1, len(batches))
        grads = {n: (acc[n] if n in acc else (p.grad if p.grad is not None else torch.zeros_like(p)))
                 for n, p in params.items()}
    finally:
        for h in hooks:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return total, grads


# ---------------------------------------------------------------------------------------------
# The GISP engine
# ---------------------------------------------------------------------------------------------


@dataclass
class _State:
    table: StructureTable
    pruned: np.ndarray
    order: list[np.ndarray] = field(default_factory=list)
    step: np.ndarray | None = None
    score: np.ndarray | None = None
    raw: np.ndarray | None = None
    last_score: np.ndarray | None = None
    last_raw: np.ndarray | None = None


def _scores_all_layers(model, structures: Structures, layers: list[int], grads: dict[str, torch.Tensor],
                       normalisation: str) -> tuple[np.ndarray, np.ndarray]:
    """(norm, raw) scores in structure-table order; layers not in ``layers`` get NaN."""
    arch = structures.arch
    n_attn, n_mlp = structures.attention_units, arch.intermediate_size
    norm = np.full(arch.num_layers * (n_attn + n_mlp), np.nan)
    raw = norm.copy()
    for layer in layers:
        weights = layer_tensors(model, arch, layer)
        g = {s.name: grads[arch.layer_key(layer, s.name)] for s in structures.scored_slices()}
        a, m = layer_scores(structures, weights, g)
        na, nm = normalise(structures, a, m, normalisation)
        lo = layer * (n_attn + n_mlp)
        raw[lo : lo + n_attn + n_mlp] = torch.cat([a, m]).numpy()
        norm[lo : lo + n_attn + n_mlp] = torch.cat([na, nm]).numpy()
    return norm, raw


def _apply_new_removals(model, structures: Structures, table: StructureTable, pruned: np.ndarray) -> None:
    """Zero every pruned structure (idempotent: already-zero weights stay zero)."""
    n_attn = structures.attention_units
    per_layer = n_attn + structures.arch.intermediate_size
    for layer in np.unique(table.layer[pruned]).tolist():
        keep = ~pruned[layer * per_layer : (layer + 1) * per_layer]
        zero_removed_(structures, layer_tensors(model, structures.arch, layer), keep[:n_attn], keep[n_attn:])


def gisp_ranking(
    model: torch.nn.Module,
    arch: ArchInfo,
    objective: Objective,
    cfg: BuildConfig,
    reporter: Reporter | None = None,
) -> tuple[Ranking, list[StepRecord], int]:
    """Run GISP on ``model`` (modified in place: removed structures end up zeroed).

    Returns the ranking, the per-step trajectory and the number of steps planned.
    """
    reporter = reporter or SilentReporter()
    structures = Structures(arch, cfg.gqa_mode)
    prunable_layers = arch.prunable_layers(cfg.skip_first_frac, cfg.skip_last)
    if not prunable_layers:
        raise NestpruneError(f"a {arch.num_layers}-layer model has no prunable layer with this layer skip")
    table = structure_table(structures, prunable_layers)
    decoder_params = decoder_param_count(model, arch)
    n = len(table)
    protected = ~table.prunable
    st = _State(table=table, pruned=np.zeros(n, bool), step=np.full(n, -1, np.int32),
                score=np.zeros(n), raw=np.zeros(n))
    steps_planned = cfg.steps_for(arch.num_layers)
    one_shot = cfg.method == "gisp-oneshot"
    delta = ratio_step(cfg.r_max, steps_planned)
    all_layers = list(range(arch.num_layers))
    named = dict(model.named_parameters())
    params_for = {
        tuple(layers): {arch.layer_key(layer, s.name): named[arch.layer_key(layer, s.name)]
                        for layer in layers for s in structures.scored_slices()}
        for layers in (prunable_layers, all_layers)
    }
    trajectory: list[StepRecord] = []
    t = 0
    while True:
        t0 = time.perf_counter()
        if one_shot:
            ratio = 1.0 if cfg.max_sparsity is not None else cfg.r_max
        else:
            ratio = min(1.0, t * delta)
        # never-pruned layers are scored once, on the dense model, to order them among themselves
        layers = all_layers if t == 0 else prunable_layers
        loss, grads = accumulate_gradients(model, objective, params_for[tuple(layers)], cfg.batch_size,
                                           lambda d, tot, t=t: reporter.on_batch(t, d, tot))
        norm, raw = _scores_all_layers(model, structures, layers, grads, cfg.normalisation)
        del grads
        if t == 0:
            st.last_score, st.last_raw = norm.copy(), raw.copy()
        else:
            st.last_score[table.prunable], st.last_raw[table.prunable] = norm[table.prunable], raw[table.prunable]
        new_pruned = select_pruned(np.nan_to_num(norm, nan=np.inf), st.pruned, protected, ratio)
        newly = order_within_step(new_pruned & ~st.pruned, norm, table.layer, table.kind, table.index)
        if one_shot and cfg.max_sparsity is not None:  # keep the shortest prefix reaching the target
            removed = np.cumsum(table.cost[newly]) / decoder_params
            newly = newly[: int(np.searchsorted(removed, cfg.max_sparsity - 1e-12)) + 1]
        st.order.append(newly)
        st.step[newly], st.score[newly], st.raw[newly] = t, norm[newly], raw[newly]
        st.pruned[newly] = True
        _apply_new_removals(model, structures, table, st.pruned)
        sparsity = float(table.cost[st.pruned].sum()) / decoder_params
        rec = StepRecord(step=t, ratio=float(ratio), structures_removed=int(st.pruned.sum()),
                         param_sparsity=sparsity, loss=loss if math.isfinite(loss) else None,
                         seconds=time.perf_counter() - t0)
        trajectory.append(rec)
        reporter.on_step(rec, steps_planned)
        t += 1
        if one_shot or bool(st.pruned[table.prunable].all()):
            break
        if cfg.max_sparsity is not None:
            if sparsity >= cfg.max_sparsity or ratio >= 1.0:
                break
        elif t >= steps_planned:
            break
    ranking = _finish_ranking(structures, decoder_params, st)
    return ranking, trajectory, steps_planned


def _finish_ranking(structures: Structures, decoder_params: int, st: _State) -> Ranking:
    table = st.table
    rest = np.flatnonzero(~st.pruned & table.prunable)
    rest = rest[np.lexsort((table.index[rest], table.kind[rest], table.layer[rest], st.last_score[rest]))]
    prot = np.flatnonzero(~table.prunable)
    prot = prot[np.lexsort((table.index[prot], table.kind[prot], table.layer[prot], st.last_score[prot]))]
    order = np.concatenate(st.order + [rest, prot]).astype(np.int64)
    score = st.score.copy()
    raw = st.raw.copy()
    never = ~st.pruned
    score[never], raw[never] = st.last_score[never], st.last_raw[never]
    return Ranking(
        structures=structures, decoder_params=decoder_params,
        layer=table.layer[order], kind=table.kind[order], index=table.index[order], step=st.step[order],
        score=score[order], raw_score=raw[order], cost=table.cost[order], prunable=table.prunable[order],
    )


# ---------------------------------------------------------------------------------------------
# The whole build: model dir + data -> artifact
# ---------------------------------------------------------------------------------------------


def read_arch(model_dir: Path) -> ArchInfo:
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

    attn = "eager" if needs_eager_attention(json.loads(config_path(model_dir).read_text())) else "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn, use_safetensors=True
        )
    except Exception as e:
        raise NestpruneError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def make_default_objective(data: Path | None, tokenizer, cfg: BuildConfig) -> Objective:
    if data is None:
        raise NestpruneError("--data is required: a .txt, .txt.xz or .jsonl calibration file")
    return LanguageModeling(load_calibration(Path(data), tokenizer, cfg.samples, cfg.seq_len, cfg.seed))


def build_artifact(
    model_dir: Path,
    data: Path | None,
    out: Path,
    config: BuildConfig | None = None,
    *,
    objective: Objective | None = None,
    objective_factory: Callable[[Any], Objective] | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Build the ranking artifact of ``model_dir`` and write it to ``out`` (atomically).

    ``objective`` (an instance) or ``objective_factory(tokenizer)`` overrides the default LM
    objective on ``data``.
    """
    cfg = config or BuildConfig()
    cfg.validate()
    model_dir, out = Path(model_dir), Path(out)
    prepare_out(out, force)
    arch = read_arch(model_dir)
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(model_dir)
    if objective is None:
        objective = objective_factory(tokenizer) if objective_factory else make_default_objective(data, tokenizer, cfg)
    if not isinstance(objective, Objective):
        raise NestpruneError(f"objective {objective!r} does not implement batches/loss/provenance")
    fp = fingerprint(model_dir)
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, device, dtype)
    total_params = sum(p.numel() for p in model.parameters())
    if cfg.method in ("gisp", "gisp-oneshot"):
        ranking, trajectory, planned = gisp_ranking(model, arch, objective, cfg, reporter)
    else:
        ranking, trajectory, planned = baseline_ranking(model, arch, objective, cfg)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    manifest = ArtifactManifest(
        nestprune_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        base=fp,
        arch=arch_summary(arch, ranking.decoder_params, total_params),
        objective=ObjectiveInfo(name=objective.name, provenance=objective.provenance()),
        schedule=ScheduleInfo(
            method=cfg.method, iterative=cfg.method == "gisp", r_max=cfg.r_max, steps_planned=planned,
            steps_run=len(trajectory), ratio_step=ratio_step(cfg.r_max, planned) if cfg.method == "gisp" else 0.0,
            max_sparsity_requested=cfg.max_sparsity, normalisation=cfg.normalisation, gqa_mode=cfg.gqa_mode,
            skip_first_frac=cfg.skip_first_frac, skip_last=cfg.skip_last,
            prunable_layers=arch.prunable_layers(cfg.skip_first_frac, cfg.skip_last),
            batch_size=cfg.batch_size, dtype=str(dtype).removeprefix("torch."), seed=cfg.seed,
        ),
        trajectory=trajectory,
        ranking=RankingInfo(num_structures=len(ranking), num_removed=ranking.num_removed,
                            max_sparsity=ranking.max_sparsity, fields=list(RANKING_FIELDS),
                            sha256=ranking_sha256(ranking)),
        device=_device_name(device),
        total_seconds=time.perf_counter() - started,
    )
    return write_artifact(out, manifest, ranking, force=force)


def baseline_ranking(model, arch: ArchInfo, objective: Objective, cfg: BuildConfig):
    """Baselines (wanda-sp, magnitude, random) write the same artifact format; see nestprune.baselines."""
    from nestprune.rank import baselines

    return baselines.ranking_for(cfg.method, model, arch, objective, cfg)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"

