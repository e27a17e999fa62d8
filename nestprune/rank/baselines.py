"""Baseline removal orders in GISP's format: the shared plumbing, magnitude and random (Wanda-sp: wanda.py).

Each ranking function returns a :class:`nestprune.ranking.Ranking` (every structure exactly once;
removed entries first, by ``step``; never-pruned layers last with ``prunable=False``), so artifacts,
materialize and eval treat baselines and GISP alike. The scoring math is pure (tensors in, arrays out).

**Magnitude**: a structure's raw score is the L2 norm of the weights it owns (biases excluded, as
GISP's score), divided by GISP's block constant (``ArchInfo.normaliser``); one global ascending
order, all prunable structures at step 0.

**Random**: a seeded uniform draw per structure is its score; one global ascending order, step 0.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from nestprune.arch import ArchInfo, Structures, decoder_param_count
from nestprune.errors import NestpruneError
from nestprune.rank.methods import MagnitudeConfig, RandomConfig, RankJob, RankResult, prunable_layers
from nestprune.rank.score import aggregate
from nestprune.ranking import Ranking, StructureTable, structure_table
from nestprune.schemas.artifact import StepRecord

# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def layer_weights(model: torch.nn.Module, arch: ArchInfo, layer: int) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for s in arch.slices():
        key = arch.layer_key(layer, s.name)
        if key not in params:
            raise NestpruneError(f"the model has no tensor {key}; is it a pruned variant? baselines need the base model")
        out[s.name] = params[key].detach()
    return out


def assemble_ranking(st: Structures, decoder_params: int, table: StructureTable, order: np.ndarray,
                     step: np.ndarray, score: np.ndarray, raw: np.ndarray) -> Ranking:
    """A Ranking from canonical-order arrays and a permutation ``order`` of the table."""
    if sorted(order.tolist()) != list(range(len(table))):
        raise AssertionError("a baseline order must list every structure exactly once")
    return Ranking(
        structures=st, decoder_params=int(decoder_params),
        layer=table.layer[order], kind=table.kind[order], index=table.index[order],
        step=step[order].astype(np.int32), score=score[order].astype(np.float64),
        raw_score=raw[order].astype(np.float64), cost=table.cost[order], prunable=table.prunable[order],
    )


def global_order(st: Structures, decoder_params: int, table: StructureTable,
                 score: np.ndarray, raw: np.ndarray) -> Ranking:
    """One global ascending order, all prunable structures removed at step 0; never-pruned layers last."""
    keys = (table.index, table.kind, table.layer, score)
    pos = np.lexsort(keys)
    order = np.concatenate([pos[table.prunable[pos]], pos[~table.prunable[pos]]])
    step = np.where(table.prunable, 0, -1)
    return assemble_ranking(st, decoder_params, table, order, step, score, raw)


# ---------------------------------------------------------------------------------------------
# Magnitude and random
# ---------------------------------------------------------------------------------------------


def magnitude_layer_scores(st: Structures, weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm of the weights each structure owns (biases excluded): (attention units,), (channels,). Pure."""
    attn, mlp = aggregate(st, lambda s: weights[s.name].double().cpu().pow(2))
    return attn.sqrt(), mlp.sqrt()


def magnitude_ranking(
    model: torch.nn.Module,
    st: Structures,
    *,
    skip_first_frac: float = 0.1,
    skip_last: int = 1,
    decoder_params: int | None = None,
    normalisation: str = "reference",
) -> Ranking:
    """Global magnitude order: ‖W_s‖₂ / block constant (GISP's normaliser), ascending, all at step 0."""
    arch = st.arch
    table = structure_table(st, prunable_layers(arch, skip_first_frac, skip_last))
    akind = st.attention_kind
    raw = np.zeros(len(table))
    score = np.zeros(len(table))
    per_layer = st.attention_units + arch.intermediate_size
    for layer in range(arch.num_layers):
        a, c = magnitude_layer_scores(st, layer_weights(model, arch, layer))
        lo = layer * per_layer
        raw[lo : lo + per_layer] = torch.cat([a, c]).numpy()
        score[lo : lo + per_layer] = torch.cat([a / arch.normaliser(akind, normalisation),
                                                c / arch.normaliser("channel", normalisation)]).numpy()
    dp = decoder_params if decoder_params is not None else decoder_param_count(model, arch)
    return global_order(st, dp, table, score, raw)


def random_ranking(
    st: Structures,
    *,
    seed: int = 0,
    decoder_params: int,
    skip_first_frac: float = 0.1,
    skip_last: int = 1,
) -> Ranking:
    """A seeded random global order: each structure's score is a U(0, 1) draw; ascending, all at step 0."""
    table = structure_table(st, prunable_layers(st.arch, skip_first_frac, skip_last))
    score = np.random.default_rng(seed).random(len(table))
    return global_order(st, decoder_params, table, score, score.copy())


# ---------------------------------------------------------------------------------------------
# Trajectory
# ---------------------------------------------------------------------------------------------


def thin_trajectory(ranking: Ranking, planned: int, seconds: float, limit: int = 256) -> list[StepRecord]:
    """Step records (cumulative structures removed and parameter sparsity after each step), at most
    ``limit`` evenly spaced steps plus the last one; ``seconds`` goes to the first."""
    removed = ranking.num_removed
    if removed == 0:
        return []
    steps = ranking.step[:removed]
    ends = np.flatnonzero(np.r_[steps[1:] != steps[:-1], True])  # last entry of each step
    if len(ends) > limit:
        ends = np.unique(np.r_[ends[np.linspace(0, len(ends) - 1, limit).astype(int)], ends[-1]])
    curve = ranking.sparsity_curve()
    return [StepRecord(step=int(steps[e]), ratio=float(steps[e]) / planned if planned > 1 else 1.0,
                       structures_removed=int(e + 1), param_sparsity=float(min(1.0, curve[e + 1])), loss=None,
                       seconds=seconds if i == 0 else 0.0)
            for i, e in enumerate(ends.tolist())]


# ---------------------------------------------------------------------------------------------
# The registered methods
# ---------------------------------------------------------------------------------------------


def rank_magnitude(cfg: MagnitudeConfig, job: RankJob) -> RankResult:
    """``--method magnitude``."""
    t0 = time.perf_counter()
    ranking = magnitude_ranking(job.model, job.structures, skip_first_frac=job.skip_first_frac,
                                skip_last=job.skip_last, normalisation=cfg.normalisation,
                                decoder_params=decoder_param_count(job.model, job.structures.arch))
    return RankResult(ranking=ranking, trajectory=thin_trajectory(ranking, 1, time.perf_counter() - t0),
                      steps_planned=1, normalisation=cfg.normalisation)


def rank_random(cfg: RandomConfig, job: RankJob) -> RankResult:
    """``--method random``: the draw is seeded by the build's seed."""
    t0 = time.perf_counter()
    ranking = random_ranking(job.structures, seed=job.seed, skip_first_frac=job.skip_first_frac,
                             skip_last=job.skip_last, decoder_params=decoder_param_count(job.model, job.structures.arch))
    return RankResult(ranking=ranking, trajectory=thin_trajectory(ranking, 1, time.perf_counter() - t0),
                      steps_planned=1)
