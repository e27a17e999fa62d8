"""The GISP loop: accumulate gradients → score → select → apply, step after step, on the model.

One step of iterative GISP (GISP.md):

1. **accumulate** — one pass over the objective's batches: its value and its gradient for the scored
   weights, in fp32 (:func:`accumulate_gradients`);
2. **score** — per-structure scores from weights × gradients, block-normalised (``score.py``);
3. **select** — the global threshold at this step's ratio r_t (``schedule.py``): the newly removed
   structures, in ascending score;
4. **apply** — zero them in the model (``mask.py``), so the next step's gradients see the masked model.

Everything the loop carries from step to step is one :class:`GispState` (what a checkpoint would hold);
what is fixed for the whole run is one :class:`GispPlan`. The math lives in the pure modules; this file
only sequences it, and is the only place that runs a backward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from nestprune.arch import Structures, decoder_param_count
from nestprune.objectives.base import Objective
from nestprune.rank.mask import layer_tensors, zero_removed_
from nestprune.rank.methods import GispConfig, GispOneShotConfig, RankJob, RankResult, Reporter
from nestprune.rank.schedule import order_within_step, ratio_step, select_pruned
from nestprune.rank.score import layer_scores, normalise
from nestprune.ranking import Ranking, StructureTable, structure_table
from nestprune.schemas.artifact import StepRecord

# ---------------------------------------------------------------------------------------------
# Plan and state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GispPlan:
    """What is fixed for the whole run."""

    structures: Structures
    table: StructureTable
    prunable_layers: list[int]
    decoder_params: int
    steps_planned: int
    r_max: float
    one_shot: bool
    normalisation: str
    max_sparsity: float | None
    batch_size: int

    @property
    def delta(self) -> float:
        return ratio_step(self.r_max, self.steps_planned)

    def ratio(self, t: int) -> float:
        """The structure ratio of step ``t``."""
        if self.one_shot:
            return 1.0 if self.max_sparsity is not None else self.r_max
        return min(1.0, t * self.delta)

    def layers(self, t: int) -> list[int]:
        """Layers scored at step ``t``: never-pruned layers only once, on the dense model, to order them."""
        return list(range(self.structures.arch.num_layers)) if t == 0 else self.prunable_layers


@dataclass
class GispState:
    """What the loop carries from step to step, in structure-table order."""

    pruned: np.ndarray  # (N,) bool
    step: np.ndarray  # (N,) int32: the step that removed each structure, -1 if none
    score: np.ndarray  # (N,) normalised score at removal
    raw: np.ndarray  # (N,) raw score at removal
    order: list[np.ndarray] = field(default_factory=list)  # positions removed by each step, in order
    last_score: np.ndarray | None = None  # latest scores of every structure (orders the never-removed)
    last_raw: np.ndarray | None = None
    trajectory: list[StepRecord] = field(default_factory=list)
    t: int = 0  # the next step

    @classmethod
    def start(cls, n: int) -> GispState:
        return cls(pruned=np.zeros(n, bool), step=np.full(n, -1, np.int32), score=np.zeros(n), raw=np.zeros(n))


def plan_gisp(job: RankJob, *, r_max: float, steps: int | None, one_shot: bool, normalisation: str) -> GispPlan:
    structures = job.structures
    arch = structures.arch
    prunable = job.prunable_layers()
    if one_shot:
        planned = 1
    else:
        planned = steps if steps is not None else max(16, round(3.5 * arch.num_layers))
    return GispPlan(structures=structures, table=structure_table(structures, prunable), prunable_layers=prunable,
                    decoder_params=decoder_param_count(job.model, arch), steps_planned=planned, r_max=r_max,
                    one_shot=one_shot, normalisation=normalisation, max_sparsity=job.max_sparsity,
                    batch_size=job.batch_size)


# ---------------------------------------------------------------------------------------------
# 1. accumulate
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


def scored_params(model: torch.nn.Module, structures: Structures, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """The weights whose gradients the score needs, in ``layers``."""
    arch = structures.arch
    named = dict(model.named_parameters())
    return {arch.layer_key(layer, s.name): named[arch.layer_key(layer, s.name)]
            for layer in layers for s in structures.scored_slices()}


# ---------------------------------------------------------------------------------------------
# 2. score
# ---------------------------------------------------------------------------------------------


def score_layers(model: torch.nn.Module, structures: Structures, layers: list[int], grads: dict[str, torch.Tensor],
                 normalisation: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised, raw) scores in structure-table order; layers not in ``layers`` get NaN."""
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


# ---------------------------------------------------------------------------------------------
# 3. select
# ---------------------------------------------------------------------------------------------


def select_step(plan: GispPlan, state: GispState, norm: np.ndarray, raw: np.ndarray, ratio: float) -> np.ndarray:
    """Record this step's scores and removals in ``state``; returns the newly removed positions, in order."""
    table = plan.table
    if state.t == 0:
        state.last_score, state.last_raw = norm.copy(), raw.copy()
    else:
        state.last_score[table.prunable], state.last_raw[table.prunable] = norm[table.prunable], raw[table.prunable]
    new_pruned = select_pruned(np.nan_to_num(norm, nan=np.inf), state.pruned, ~table.prunable, ratio)
    newly = order_within_step(new_pruned & ~state.pruned, norm, table.layer, table.kind, table.index)
    if plan.one_shot and plan.max_sparsity is not None:  # keep the shortest prefix reaching the target
        removed = np.cumsum(table.cost[newly]) / plan.decoder_params
        newly = newly[: int(np.searchsorted(removed, plan.max_sparsity - 1e-12)) + 1]
    state.order.append(newly)
    state.step[newly], state.score[newly], state.raw[newly] = state.t, norm[newly], raw[newly]
    state.pruned[newly] = True
    return newly


# ---------------------------------------------------------------------------------------------
# 4. apply
# ---------------------------------------------------------------------------------------------


def apply_removals(model: torch.nn.Module, plan: GispPlan, state: GispState) -> None:
    """Zero every pruned structure (idempotent: already-zero weights stay zero)."""
    structures, table = plan.structures, plan.table
    n_attn = structures.attention_units
    per_layer = n_attn + structures.arch.intermediate_size
    for layer in np.unique(table.layer[state.pruned]).tolist():
        keep = ~state.pruned[layer * per_layer : (layer + 1) * per_layer]
        zero_removed_(structures, layer_tensors(model, structures.arch, layer), keep[:n_attn], keep[n_attn:])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def sparsity(plan: GispPlan, state: GispState) -> float:
    return float(plan.table.cost[state.pruned].sum()) / plan.decoder_params


def finished(plan: GispPlan, state: GispState, ratio: float) -> bool:
    """After step ``state.t - 1``: stop?"""
    if plan.one_shot or bool(state.pruned[plan.table.prunable].all()):
        return True
    if plan.max_sparsity is not None:
        return sparsity(plan, state) >= plan.max_sparsity or ratio >= 1.0
    return state.t >= plan.steps_planned


def run_step(model: torch.nn.Module, objective: Objective, plan: GispPlan, state: GispState,
             params_for: dict[tuple[int, ...], dict[str, torch.nn.Parameter]], reporter: Reporter) -> float:
    """One step: accumulate → score → select → apply; appends its record to the trajectory. Returns its ratio."""
    t0 = time.perf_counter()
    t = state.t
    ratio = plan.ratio(t)
    layers = plan.layers(t)
    loss, grads = accumulate_gradients(model, objective, params_for[tuple(layers)], plan.batch_size,
                                       lambda d, tot: reporter.on_batch(t, d, tot))
    norm, raw = score_layers(model, plan.structures, layers, grads, plan.normalisation)
    del grads
    select_step(plan, state, norm, raw, ratio)
    apply_removals(model, plan, state)
    rec = StepRecord(step=t, ratio=float(ratio), structures_removed=int(state.pruned.sum()),
                     param_sparsity=sparsity(plan, state), loss=loss if math.isfinite(loss) else None,
                     seconds=time.perf_counter() - t0)
    state.trajectory.append(rec)
    state.t = t + 1
    reporter.on_step(rec, plan.steps_planned)
    return ratio


def run_gisp(model: torch.nn.Module, objective: Objective, plan: GispPlan, reporter: Reporter,
             state: GispState | None = None) -> tuple[Ranking, GispState]:
    """Run GISP on ``model`` (modified in place: removed structures end up zeroed) from ``state`` (a fresh
    one by default) to the end of the plan."""
    state = state or GispState.start(len(plan.table))
    params_for = {tuple(layers): scored_params(model, plan.structures, layers)
                  for layers in (plan.prunable_layers, list(range(plan.structures.arch.num_layers)))}
    while True:
        ratio = run_step(model, objective, plan, state, params_for, reporter)
        if finished(plan, state, ratio):
            break
    return finish_ranking(plan, state), state


def finish_ranking(plan: GispPlan, state: GispState) -> Ranking:
    """The removal order: what the steps removed, in order; then the rest of the prunable structures by
    their last score; then the never-pruned layers' structures by their dense score."""
    table = plan.table
    rest = np.flatnonzero(~state.pruned & table.prunable)
    rest = rest[np.lexsort((table.index[rest], table.kind[rest], table.layer[rest], state.last_score[rest]))]
    prot = np.flatnonzero(~table.prunable)
    prot = prot[np.lexsort((table.index[prot], table.kind[prot], table.layer[prot], state.last_score[prot]))]
    order = np.concatenate(state.order + [rest, prot]).astype(np.int64)
    score = state.score.copy()
    raw = state.raw.copy()
    never = ~state.pruned
    score[never], raw[never] = state.last_score[never], state.last_raw[never]
    return Ranking(
        structures=plan.structures, decoder_params=plan.decoder_params,
        layer=table.layer[order], kind=table.kind[order], index=table.index[order], step=state.step[order],
        score=score[order], raw_score=raw[order], cost=table.cost[order], prunable=table.prunable[order],
    )


# ---------------------------------------------------------------------------------------------
# The registered methods
# ---------------------------------------------------------------------------------------------


def rank_gisp(cfg: GispConfig, job: RankJob) -> RankResult:
    """``--method gisp``: the iterative schedule."""
    plan = plan_gisp(job, r_max=cfg.r_max, steps=cfg.steps, one_shot=False, normalisation=cfg.normalisation)
    ranking, state = run_gisp(job.model, job.objective, plan, job.reporter)
    return RankResult(ranking=ranking, trajectory=state.trajectory, steps_planned=plan.steps_planned,
                      iterative=True, r_max=cfg.r_max, ratio_step=plan.delta, normalisation=cfg.normalisation)


def rank_gisp_oneshot(cfg: GispOneShotConfig, job: RankJob) -> RankResult:
    """``--method gisp-oneshot``: one step on the dense model."""
    plan = plan_gisp(job, r_max=cfg.r_max, steps=None, one_shot=True, normalisation=cfg.normalisation)
    ranking, state = run_gisp(job.model, job.objective, plan, job.reporter)
    return RankResult(ranking=ranking, trajectory=state.trajectory, steps_planned=plan.steps_planned,
                      iterative=False, r_max=cfg.r_max, ratio_step=0.0, normalisation=cfg.normalisation)
