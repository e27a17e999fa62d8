"""Wanda-sp (FLAP's ``prune_wanda_sp``, the baseline of the GISP paper's tables) as a nested removal order.

For a Linear with weight ``W`` (out, in) and calibration inputs ``X`` (tokens, in), the per-weight
metric is ``|W_ij| · ‖X_j‖₂`` (input-feature L2 norm over all calibration tokens). Two aggregations:

* ``convention="flap"`` (default, the reference): only the output projections are scored. A head's
  score is the mean over output rows of the o_proj metric, summed over the head's ``head_dim``
  columns; a channel's score is the mean over rows of the down_proj metric in its column.
  (FLAP scales by ``sqrt(‖X_j‖²/n_samples)``; a per-layer constant that changes no order.)
* ``convention="full"``: the metric summed over every weight the structure owns, as GISP's score
  aggregates (q/k/v rows with the q_proj input norms, o columns with the o_proj input norms,
  gate/up rows with the MLP input norms, down columns with the down_proj input norms; GQA query
  mode: q rows and o columns only).

The reference prunes the same ratio ``r`` of heads (``int(r·H)``) and of channels (``int(r·I)``)
in every prunable layer, each layer's lowest-scoring first, with GISP's layer skip; it tunes ``r``
until the parameter sparsity reaches the target. Here ``r`` is swept in ``T`` steps, ``r_t = t/T``
(default ``T = max(units, I)``: one channel per layer per step). Step ``t`` removes, in every
prunable layer, the structures ranked ``[int(r_{t-1}·n), int(r_t·n))`` of that layer (exact integer
arithmetic), so **every step boundary is "the same share in every prunable layer"** and the shortest
step boundary reaching a sparsity is the reference's tuned ratio. Inside a step, attention units
come before channels, each round-robin over layers; a prefix ending inside a step differs from
uniform by at most one structure of each kind per layer (:func:`step_boundary_prefix` rounds up to the boundary).

The scoring math is pure (tensors in, arrays out); :func:`input_sq_norms` is the only part that runs
the model (forward hooks, ``no_grad``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch

from nestprune.arch import ArchInfo, Structures, decoder_param_count
from nestprune.errors import NestpruneError
from nestprune.rank.baselines import assemble_ranking, layer_weights, thin_trajectory
from nestprune.rank.methods import RankJob, RankResult, WandaSpConfig, prunable_layers
from nestprune.rank.score import aggregate, fold_attention
from nestprune.ranking import Ranking, StructureTable, structure_table

WandaConvention = Literal["flap", "full"]
Batches = torch.Tensor | Iterable[Mapping[str, torch.Tensor]]
Progress = Callable[[int, int], None]



# ---------------------------------------------------------------------------------------------
# Activation statistics
# ---------------------------------------------------------------------------------------------


def _iter_batches(windows: Batches, batch_size: int) -> tuple[int, Iterable[Mapping[str, torch.Tensor]]]:
    if isinstance(windows, torch.Tensor):
        if windows.ndim != 2 or len(windows) == 0:
            raise NestpruneError(f"calibration windows must be a non-empty (n, seq_len) tensor, got {tuple(windows.shape)}")
        n = math.ceil(len(windows) / batch_size)
        return n, ({"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size))
    batches = list(windows)
    if not batches:
        raise NestpruneError("no calibration batches")
    return len(batches), batches


@torch.no_grad()
def input_sq_norms(
    model: torch.nn.Module,
    arch: ArchInfo,
    windows: Batches,
    *,
    modules: tuple[str, ...] | None = None,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over calibration tokens of x_j² for the input of each Linear, and the token count.

    ``windows``: (n, seq_len) token ids, or batches ``{"input_ids", ["attention_mask"]}`` (masked
    positions are left out). ``modules`` (names inside a layer) default to the family's output projections.
    Keys of the result are full module names (``model.layers.3.mlp.down_proj``); values are fp64 on the
    CPU, shape (in_features,). ‖X_j‖₂ is the square root.
    """
    modules = arch.fam.output_modules if modules is None else modules
    if batch_size < 1:
        raise NestpruneError(f"--batch-size must be at least 1, got {batch_size}")
    layers = list(range(arch.num_layers)) if layers is None else list(layers)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None}
    handles = []

    def hook(name: str):
        def fn(_module, inputs, _output):
            x = inputs[0]  # (B, T, in)
            m = state["mask"]
            x = x[m] if m is not None else x.reshape(-1, x.shape[-1])  # (tokens, in)
            sq = x.float().pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq

        return fn

    try:
        for layer in layers:
            for mod in modules:
                name = arch.layer_key(layer, mod)
                try:
                    handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
                except AttributeError:
                    raise NestpruneError(f"the model has no module {name}") from None
        total, it = _iter_batches(windows, batch_size)
        tokens = 0
        was_training = model.training
        model.eval()
        for i, batch in enumerate(it):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = mask.to(device) if mask is not None else None
            state["mask"] = mask.bool() if mask is not None else None
            tokens += int(mask.sum()) if mask is not None else ids.numel()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            if progress:
                progress(i + 1, total)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return {k: v.double().cpu() for k, v in sums.items()}, tokens



# ---------------------------------------------------------------------------------------------
# Wanda-sp
# ---------------------------------------------------------------------------------------------


def wanda_layer_scores(
    st: Structures,
    weights: Mapping[str, torch.Tensor],
    in_norms: Mapping[str, torch.Tensor],
    convention: WandaConvention = "flap",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda-sp scores of one layer: (attention units,), (channels,) in fp64. Pure.

    ``weights``: slice name → tensor (e.g. "mlp.down_proj.weight"); ``in_norms``: module name inside
    the layer (e.g. "mlp.down_proj") → ‖X_j‖₂ over calibration tokens, (in_features,).
    """
    def metric(name: str) -> torch.Tensor:
        w = weights[name].double().cpu()
        return w.abs() * in_norms[name.rsplit(".", 1)[0]].double()[None, :]  # (out, in)

    if convention == "flap":
        o_slice, down_slice = st.arch.fam.output_slice("q"), st.arch.fam.output_slice("mlp")
        o = metric(o_slice.name).mean(0)  # (H·d_h,)
        heads = o.reshape(st.arch.num_heads, st.arch.head_dim).sum(1)  # (H,)
        attn = fold_attention(st, o_slice, heads)
        return attn, metric(down_slice.name).mean(0)  # (I,)
    if convention != "full":
        raise NestpruneError(f"unknown Wanda-sp convention {convention!r} (use 'flap' or 'full')")
    return aggregate(st, lambda s: metric(s.name))


def wanda_modules(st: Structures, convention: WandaConvention) -> tuple[str, ...]:
    """Linear modules whose input norms the convention needs (names inside a layer)."""
    if convention == "flap":
        return st.arch.fam.output_modules
    return tuple(dict.fromkeys(s.name.rsplit(".", 1)[0] for s in st.scored_slices()))


def uniform_sweep(table: StructureTable, score: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The same-ratio-per-layer removal order (pure).

    Returns (order, step): ``order`` a permutation of the table (prunable structures by step; inside a
    step attention units, then channels, each round-robin over layers by within-layer rank, so any
    prefix is within one structure of each kind of uniform; never-pruned layers last, by rank and layer), ``step`` (N,) in table order: the ``t`` in 1..steps whose ratio t/steps first
    removes the structure, -1 in never-pruned layers. A layer's structures of one kind leave in
    ascending score (ties: index).
    """
    n = len(table)
    rank = np.zeros(n, dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    for layer in np.unique(table.layer).tolist():
        for kind in np.unique(table.kind).tolist():
            sel = np.flatnonzero((table.layer == layer) & (table.kind == kind))
            pos = sel[np.lexsort((table.index[sel], score[sel]))]
            rank[pos] = np.arange(len(pos))
            count[sel] = len(sel)
    # ratio t/T removes floor(t·n/T) of n; the structure ranked ρ leaves at the first t with that > ρ.
    step = ((rank + 1) * steps + count - 1) // count
    step = np.where(table.prunable, step, -1)
    pr = np.flatnonzero(table.prunable)
    pr = pr[np.lexsort((table.layer[pr], rank[pr], table.kind[pr], step[pr]))]  # round-robin over layers
    never = np.flatnonzero(~table.prunable)
    never = never[np.lexsort((table.kind[never], table.layer[never], rank[never]))]
    order = np.concatenate([pr, never])
    return order, step.astype(np.int64)


def wanda_sp_ranking(
    model: torch.nn.Module,
    st: Structures,
    windows: Batches,
    *,
    batch_size: int = 8,
    skip_first_frac: float = 0.1,
    skip_last: int = 1,
    decoder_params: int | None = None,
    convention: WandaConvention = "flap",
    steps: int | None = None,
    max_sparsity: float | None = None,
    progress: Progress | None = None,
) -> Ranking:
    """Wanda-sp as a nested removal order (see the module docstring).

    ``windows``: calibration token windows (n, seq_len) or batches of ``input_ids``/``attention_mask``;
    ``steps``: the ratio resolution T (default: max(attention units, channels) per layer);
    ``max_sparsity``: entries after the first step boundary reaching it get ``step = -1`` (order unchanged).
    The model is only read (eval mode, no gradients).
    """
    arch = st.arch
    prunable = prunable_layers(arch, skip_first_frac, skip_last)
    table = structure_table(st, prunable)
    n_attn, n_mlp = st.attention_units, arch.intermediate_size
    steps = steps if steps is not None else max(n_attn, n_mlp)
    if steps < 1:
        raise NestpruneError(f"wanda-sp needs at least 1 ratio step, got {steps}")
    mods = wanda_modules(st, convention)
    sq, _ = input_sq_norms(model, arch, windows, modules=mods, batch_size=batch_size, progress=progress)
    score = np.zeros(len(table))
    per_layer = n_attn + n_mlp
    for layer in range(arch.num_layers):
        norms = {m: sq[arch.layer_key(layer, m)].sqrt() for m in mods}
        a, c = wanda_layer_scores(st, layer_weights(model, arch, layer), norms, convention)
        score[layer * per_layer : (layer + 1) * per_layer] = torch.cat([a, c]).numpy()
    order, step = uniform_sweep(table, score, steps)
    dp = decoder_params if decoder_params is not None else decoder_param_count(model, arch)
    if max_sparsity is not None:
        step = _cut_at_sparsity(table, order, step, dp, max_sparsity)
    return assemble_ranking(st, dp, table, order, step, score, score)


def _cut_at_sparsity(table: StructureTable, order: np.ndarray, step: np.ndarray, decoder_params: int,
                     max_sparsity: float) -> np.ndarray:
    """Mark everything after the first step boundary reaching ``max_sparsity`` as never removed (-1)."""
    s = step[order]
    removed = np.cumsum(table.cost[order]) / decoder_params
    hit = np.flatnonzero((removed >= max_sparsity - 1e-12) & (s >= 0))
    if not len(hit):
        return step
    last_step = s[hit[0]]
    out = step.copy()
    out[(step > last_step)] = -1
    return out


def step_boundary_prefix(ranking: Ranking, prefix_len: int) -> int:
    """Round a prefix length up to the end of the schedule step it ends in (Wanda-sp: uniform ratio)."""
    if prefix_len <= 0:
        return 0
    last = ranking.step[prefix_len - 1]
    if last < 0:
        return prefix_len
    return int(np.flatnonzero(ranking.step == last)[-1]) + 1


# ---------------------------------------------------------------------------------------------
# The registered method
# ---------------------------------------------------------------------------------------------


def objective_windows(objective: Any, batch_size: int) -> Batches:
    """What Wanda-sp feeds the model: the LM objective's windows, or any objective's batches (ids and mask)."""
    calib = getattr(objective, "calib", None)
    if calib is not None and isinstance(getattr(calib, "windows", None), torch.Tensor):
        return calib.windows
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
            for b in objective.batches(batch_size)]


def rank_wanda_sp(cfg: WandaSpConfig, job: RankJob) -> RankResult:
    """``--method wanda-sp``. The trajectory lists at most 256 evenly spaced ratio steps plus the last one."""
    t0 = time.perf_counter()
    st = job.structures
    ranking = wanda_sp_ranking(job.model, st, objective_windows(job.objective, job.batch_size),
                               batch_size=job.batch_size, skip_first_frac=job.skip_first_frac,
                               skip_last=job.skip_last, decoder_params=decoder_param_count(job.model, st.arch),
                               convention=cfg.convention, steps=cfg.steps, max_sparsity=job.max_sparsity)
    planned = cfg.steps if cfg.steps is not None else max(st.attention_units, st.arch.intermediate_size)
    return RankResult(ranking=ranking, trajectory=thin_trajectory(ranking, planned, time.perf_counter() - t0),
                      steps_planned=planned)
