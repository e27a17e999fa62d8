"""The GISP loop: accumulate gradients → score → select → apply, step after step, on the model.

One step of iterative GISP (GISP.md):

1. **accumulate** — one pass over the objective's batches: its value and its gradient for the scored
   weights, in fp32 (:func:`accumulate_gradients`);
2. **score** — per-structure scores from weights × gradients, block-normalised (``score.py``);
3. **select** — the global threshold at this step's ratio r_t (``schedule.py``): the newly removed
   structures, in ascending score;
4. **apply** — zero them in the model (``mask.py``), so the next step's gradients see the masked model,
   and cut them out of it where that pays (``compact.py``; the zeroing path is ``--no-compact``).

What the loop carries from step to step is split in two. :class:`GispState` is the full-width picture
(what was removed, at which step and score, the latest scores, the step index): small numpy arrays in
structure-table order, what a checkpoint holds. :class:`Workspace` is the working side: the model as
compaction has cut it, which original structure sits at each position of each layer, and the
persistent gradient accumulators; it is never saved and is rebuilt from a dense model and a GispState
(:meth:`Workspace.replay`). What is fixed for the whole run is one :class:`GispPlan`. The math lives in
the pure modules; this file only sequences it, and is the only place that runs a backward pass.

The loop has two seams for the outside (:class:`StepHooks`; ``nestprune.resume`` implements them): where
to start (a state restored from a checkpoint), and a call after every completed step (save one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from nestprune.arch import Structures, decoder_param_count
from nestprune.objectives.base import Objective
from nestprune.rank import attention
from nestprune.rank.compact import CompactPolicy, LayerLayout, default_policy, select_, zero_positions_
from nestprune.rank.compact import expand_ as expand_layer_
from nestprune.rank.distributed import SINGLE, Group, sharded_scores, zero_sharded_
from nestprune.rank.mask import layer_tensors
from nestprune.rank.memory import install_accumulators, remove_accumulators, skip_packed_check
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
    compact: bool = True  # cut removed structures out of the working model (False: only zero them)
    policy: CompactPolicy = CompactPolicy()
    accumulator: str = "fp32"  # how non-fp32 gradients accumulate (memory.ACCUMULATORS)
    seed: int = 0  # of the stochastic rounding (bf16-stochastic)

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
    """The full-width picture the loop carries from step to step, in structure-table order (independent of
    compaction, micro-batch and device: what a checkpoint holds)."""

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
    device = next(job.model.parameters()).device
    return GispPlan(structures=structures, table=structure_table(structures, prunable), prunable_layers=prunable,
                    decoder_params=decoder_param_count(job.model, arch), steps_planned=planned, r_max=r_max,
                    one_shot=one_shot, normalisation=normalisation, max_sparsity=job.max_sparsity,
                    batch_size=job.batch_size, compact=job.compact and not one_shot,
                    policy=job.compact_policy or default_policy(device), accumulator=job.accumulator, seed=job.seed)


# ---------------------------------------------------------------------------------------------
# 1. accumulate
# ---------------------------------------------------------------------------------------------


def accumulate_gradients(
    model: torch.nn.Module,
    objective: Objective,
    params: dict[str, torch.nn.Parameter],
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
    *,
    accumulator: str = "fp32",
    buffers: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """One full pass over the objective's batches: (objective value, its gradient for ``params``).

    Only ``params`` require gradients; everything else is frozen. Gradients accumulate as
    ``memory.install_accumulators`` sets them up (the memory plan runs the same code): fp32 parameters in
    a persistent fp32 ``.grad``; lower-precision ones are folded into the ``accumulator`` mode's buffers the
    moment each gradient is ready (fp32 by default), so no full set of low-precision gradients is ever
    held. ``buffers`` (name -> tensor) are reused across calls (zeroed, remade only when a shape
    changed) and hold the returned gradients. Nothing waits for the device between micro-batches: the
    batches go over from pinned memory, and the loss is summed on the device and read once, at the end.
    """
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    buffers = {} if buffers is None else buffers
    hooks: list = []
    batches = list(objective.batches(batch_size))
    total = torch.zeros((), dtype=torch.float64, device=device)
    # no batch brings position ids (the model makes 0..T-1): no packed-sequence check, no host sync per batch
    undo_check = skip_packed_check() if not any("position_ids" in b for b in batches) else (lambda: None)
    try:
        buffers, hooks = install_accumulators(params, accumulator, buffers=buffers, generator=generator)
        for i, batch in enumerate(batches):
            # from pinned memory the copy is asynchronous (from pageable memory CUDA makes the host wait)
            batch = {k: (v.pin_memory() if device.type == "cuda" and v.device.type == "cpu" else v)
                     .to(device, non_blocking=True) for k, v in batch.items()}
            loss = objective.loss(model, batch)
            loss.backward()
            total += loss.detach()
            del loss
            if on_batch:
                on_batch(i + 1, len(batches))
        grads = {n: buffers[n] if n in buffers else (p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in params.items()}
    finally:
        remove_accumulators(params, hooks)
        undo_check()
    return float(total), grads


def scored_params(model: torch.nn.Module, structures: Structures, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """The weights whose gradients the score needs, in ``layers``."""
    arch = structures.arch
    named = dict(model.named_parameters())
    return {arch.layer_key(layer, s.name): named[arch.layer_key(layer, s.name)]
            for layer in layers for s in structures.scored_slices()}


# ---------------------------------------------------------------------------------------------
# 2. score
# ---------------------------------------------------------------------------------------------


def layer_raw_scores(model: torch.nn.Module, structures: Structures, layer: int, grads: dict[str, torch.Tensor],
                     layout: dict[int, LayerLayout] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of one layer's structures present in the working model, in its positions' order."""
    arch = structures.arch
    lay = layout.get(layer) if layout else None
    counts = lay.counts(structures) if lay is not None else None
    weights = layer_tensors(model, arch, layer)
    g = {s.name: grads[arch.layer_key(layer, s.name)] for s in structures.scored_slices()}
    return layer_scores(structures, weights, g, counts)


def score_vectors(structures: Structures, raw_scores: dict[int, tuple[torch.Tensor, torch.Tensor]], normalisation: str,
                  layout: dict[int, LayerLayout] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(normalised, raw) scores in structure-table order from each scored layer's raw scores; layers not
    scored get NaN.

    ``layout``: which structure sits at each position of a compacted layer's tensors; a structure no
    longer present (removed, cut out) scores exactly 0, as its zeroed weights would."""
    arch = structures.arch
    n_attn, n_mlp = structures.attention_units, arch.intermediate_size
    norm = np.full(arch.num_layers * (n_attn + n_mlp), np.nan)
    raw = norm.copy()
    for layer, (a, m) in raw_scores.items():
        lay = layout.get(layer) if layout else None
        na, nm = normalise(structures, a, m, normalisation)
        lo = layer * (n_attn + n_mlp)
        for out, (ta, tm) in ((raw, (a, m)), (norm, (na, nm))):
            if lay is None:
                out[lo : lo + n_attn + n_mlp] = torch.cat([ta, tm]).numpy()
            else:
                full_a, full_m = np.zeros(n_attn), np.zeros(n_mlp)
                full_a[lay.attn], full_m[lay.mlp] = ta.numpy(), tm.numpy()
                out[lo : lo + n_attn + n_mlp] = np.concatenate([full_a, full_m])
    return norm, raw


def score_layers(model: torch.nn.Module, structures: Structures, layers: list[int], grads: dict[str, torch.Tensor],
                 normalisation: str, layout: dict[int, LayerLayout] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(normalised, raw) scores in structure-table order (:func:`score_vectors`) of ``layers``."""
    return score_vectors(structures, {layer: layer_raw_scores(model, structures, layer, grads, layout)
                                      for layer in layers}, normalisation, layout)


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
# 4. apply: the working side
# ---------------------------------------------------------------------------------------------


MIN_CHANNELS = 2  # see compact.py: a one-channel MLP would take MKL's matrix-vector path


class Workspace:
    """The working side of a run: the model as compaction has cut it, which original structure sits at
    each position of each layer (:class:`LayerLayout`), and the persistent gradient accumulators.

    Never saved: :meth:`replay` brings the base model to a saved :class:`GispState` the way the run did, so a
    run resumed from a checkpoint rebuilds it. :meth:`restore` puts the model back to full width with every
    removed structure zeroed (what the zeroing path leaves).

    ``group``: the ranks of a distributed build (``distributed.py``); each runs its share of the micro-batches,
    and the step's sums meet in :meth:`accumulate` (data parallel: the gradients are all-reduced) or, under
    ``--shard`` (no compaction), in :meth:`score` (per-unit partial scores are all-reduced).
    """

    def __init__(self, model: torch.nn.Module, plan: GispPlan, group: Group = SINGLE):
        self.model, self.plan, self.group = model, plan, group
        st = plan.structures
        self.layout = {layer: LayerLayout.full(st) for layer in range(st.arch.num_layers)}
        self.buffers: dict[str, torch.Tensor] = {}
        self.config = model.config  # the global config; a compacted Phi-3 attention gets a copy
        device = next(model.parameters()).device
        self.generator = (torch.Generator(device=device).manual_seed(plan.seed)
                          if plan.accumulator == "bf16-stochastic" and device.type != "meta" else None)
        # GQA query-head mode gathers K/V per query head from the start, compacted or not (attention.py)
        self._undo_attention = attention.prepare_attention(model, gather=not st.owns("kv"))

    def params(self, layers: list[int]) -> dict[str, torch.nn.Parameter]:
        return scored_params(self.model, self.plan.structures, layers)

    def accumulate(self, objective: Objective, layers: list[int],
                   on_batch: Callable[[int, int], None] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        params = self.params(layers)
        for name in set(self.buffers) - set(params):  # layers no longer scored (the never-pruned ones after step 0)
            del self.buffers[name]
        loss, grads = accumulate_gradients(self.model, self.group.share(objective), params, self.plan.batch_size,
                                           on_batch, accumulator=self.plan.accumulator, buffers=self.buffers,
                                           generator=self.generator)
        return self.group.reduce(loss, grads), grads  # the ranks' sums, once per step

    def score(self, layers: list[int], grads: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        st = self.plan.structures
        if self.group.shard:
            raw = sharded_scores(self.model, st, layers, grads, self.group)
        else:
            raw = {layer: layer_raw_scores(self.model, st, layer, grads, self.layout) for layer in layers}
        return score_vectors(st, raw, self.plan.normalisation, self.layout)

    def _keep(self, live: np.ndarray, multiple: int, minimum: int = 1) -> np.ndarray | None:
        """Positions to keep when a block is cut (live ones, then removed ones as padding); None: not cut."""
        width = self.plan.policy.width(int(live.sum()), len(live), multiple, minimum)
        if width is None:
            return None
        pad = np.flatnonzero(~live)[: width - int(live.sum())]
        return np.sort(np.concatenate([np.flatnonzero(live), pad]))

    def sync(self, state: GispState) -> None:
        """Bring the working model to ``state``: zero every removed structure still present, and (compacting)
        cut the blocks the policy says to cut."""
        st, table, policy = self.plan.structures, self.plan.table, self.plan.policy
        n_attn = st.attention_units
        per_layer = n_attn + st.arch.intermediate_size
        for layer in np.unique(table.layer[state.pruned]).tolist():
            removed = state.pruned[layer * per_layer : (layer + 1) * per_layer]
            lay = self.layout[layer]
            live_a, live_m = ~removed[:n_attn][lay.attn], ~removed[n_attn:][lay.mlp]
            if live_a.all() and live_m.all():
                continue
            if self.group.shard:  # compaction is off: zero the removed units in this rank's shards
                zero_sharded_(self.model, st, layer, live_a, live_m, self.group)
            else:
                zero_positions_(self.model, st, layer, lay, live_a, live_m)
            if not self.plan.compact:
                continue
            keep_a, keep_m = self._keep(live_a, policy.head_multiple), self._keep(live_m, policy.channel_multiple, MIN_CHANNELS)
            if keep_a is None and keep_m is None:
                continue
            for name in st.arch.tensor_names():  # stale accumulators go first: the cut allocates anew
                self.buffers.pop(st.arch.layer_key(layer, name), None)
            self.layout[layer] = select_(self.model, st, layer, lay,
                                         np.arange(len(lay.attn)) if keep_a is None else keep_a,
                                         np.arange(len(lay.mlp)) if keep_m is None else keep_m, self.config)

    def replay(self, state: GispState) -> None:
        """Bring the working model to a saved ``state`` the way the run reached it: one :meth:`sync` per completed
        step, so that compaction cuts the same blocks to the same widths with the same padding (a block's new
        width depends on its width before), and the resumed run computes exactly what the uninterrupted one did."""
        partial = GispState.start(len(state.pruned))
        for newly in state.order:
            partial.pruned[newly] = True
            self.sync(partial)
        if not np.array_equal(partial.pruned, state.pruned):
            raise ValueError("internal: the state's removal order does not match its removed structures")

    def widths(self) -> dict[str, int]:
        """Attention units and MLP channels present in the working model (summed over layers)."""
        return {"attention": sum(len(v.attn) for v in self.layout.values()),
                "mlp": sum(len(v.mlp) for v in self.layout.values())}

    def restore(self) -> None:
        """Full width again (absent structures as zeros), attention as it was, accumulators released."""
        self.buffers.clear()
        st = self.plan.structures
        for layer, lay in self.layout.items():
            if not lay.is_full(st):
                expand_layer_(self.model, st, layer, lay, self.config)
                self.layout[layer] = LayerLayout.full(st)
        self._undo_attention()


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


def run_step(work: Workspace, objective: Objective, plan: GispPlan, state: GispState, reporter: Reporter) -> float:
    """One step: accumulate → score → select → apply; appends its record to the trajectory. Returns its ratio."""
    t0 = time.perf_counter()
    t = state.t
    ratio = plan.ratio(t)
    layers = plan.layers(t)
    loss, grads = work.accumulate(objective, layers, lambda d, tot: reporter.on_batch(t, d, tot))
    norm, raw = work.score(layers, grads)
    del grads
    work.group.agree_step(t, norm, raw, select_step(plan, state, norm, raw, ratio))
    work.sync(state)
    rec = StepRecord(step=t, ratio=float(ratio), structures_removed=int(state.pruned.sum()),
                     param_sparsity=sparsity(plan, state), loss=loss if math.isfinite(loss) else None,
                     seconds=time.perf_counter() - t0)
    state.trajectory.append(rec)
    state.t = t + 1
    reporter.on_step(rec, plan.steps_planned)
    return ratio


class StepHooks(Protocol):
    """What a run tells the outside, at two seams (``rank/checkpoint.py``'s checkpoints implement them)."""

    def restore(self, plan: GispPlan, work: Workspace) -> GispState | None:
        """A saved state to continue from (None: start afresh); may also restore random number generators."""

    def step_done(self, plan: GispPlan, state: GispState, work: Workspace) -> None:
        """Called after every completed step, the workspace synced to ``state``."""


def done(plan: GispPlan, state: GispState) -> bool:
    """Has the run reached its end (after step ``state.t - 1``)? Never before its first step."""
    return state.t > 0 and finished(plan, state, plan.ratio(state.t - 1))


def run_gisp(model: torch.nn.Module, objective: Objective, plan: GispPlan, reporter: Reporter,
             state: GispState | None = None, hooks: StepHooks | None = None,
             group: Group | None = None) -> tuple[Ranking, GispState]:
    """Run GISP on ``model`` from ``state`` (else the one ``hooks.restore`` gives, else a fresh one) to the end
    of the plan, calling ``hooks.step_done`` after each step. The model is changed in place and handed back
    at full width with every removed structure zeroed. ``group``: the ranks of a distributed build (each
    calls this; ``hooks`` must then restore the same state on every rank)."""
    work = Workspace(model, plan, group or SINGLE)
    try:
        if state is None and hooks is not None:
            state = hooks.restore(plan, work)
        state = state or GispState.start(len(plan.table))
        work.replay(state)
        while not done(plan, state):
            run_step(work, objective, plan, state, reporter)
            if hooks is not None:
                hooks.step_done(plan, state, work)
    finally:
        work.restore()
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
    ranking, state = run_gisp(job.model, job.objective, plan, job.reporter, hooks=job.hooks, group=job.group)
    return RankResult(ranking=ranking, trajectory=state.trajectory, steps_planned=plan.steps_planned,
                      iterative=True, r_max=cfg.r_max, ratio_step=plan.delta, normalisation=cfg.normalisation)


def rank_gisp_oneshot(cfg: GispOneShotConfig, job: RankJob) -> RankResult:
    """``--method gisp-oneshot``: one step on the dense model."""
    plan = plan_gisp(job, r_max=cfg.r_max, steps=None, one_shot=True, normalisation=cfg.normalisation)
    ranking, state = run_gisp(job.model, job.objective, plan, job.reporter, hooks=job.hooks, group=job.group)
    return RankResult(ranking=ranking, trajectory=state.trajectory, steps_planned=plan.steps_planned,
                      iterative=False, r_max=cfg.r_max, ratio_step=0.0, normalisation=cfg.normalisation)
