"""The memory plan of a build: will it fit, with which micro-batch and accumulators, and how long.

Everything comes from config.json: the peaks are the build step run on the meta device
(:mod:`nestprune.rank.memory`), so the plan costs a few seconds of CPU and no weights.

Choices (``plan_build``):
  * accumulators, ``auto``: fp32 when it fits at some micro-batch, else the next mode of
    ``AUTO_ACCUMULATORS`` (less device memory, less exact). The modes apply to non-fp32 weights;
    an fp32 build always accumulates in fp32 ``.grad``.
  * micro-batch, ``auto``: the largest that fits (at most ``samples``, and on a CPU at most
    :data:`CPU_MICRO_BATCH_TOKENS` tokens: a CPU's throughput stops growing long before its memory
    runs out). The step's tokens stay ``samples × seq_len``: a smaller micro-batch means more
    micro-batches per step, not fewer tokens.
  * the peak is that of one micro-batch: the accumulators are made before the first one, so every
    micro-batch of a step allocates the same (``memory.install_accumulators``).
  * projected time: the dense model's step time at ``throughput`` scaled, step by step, by the share of
    the per-token work left once compaction has cut the structures removed so far
    (:func:`step_costs`; without compaction every step costs the dense model's).
  * "fits": the predicted peak is at most ``device_memory × (1 - headroom)``; the headroom covers what
    the plan does not model (CUDA context, allocator fragmentation and rounding, kernel workspaces).

Several GPUs (``ranks``, a torchrun build; ``rank/distributed.py``): every number is per GPU.
  * data parallel: each rank holds the whole model and all accumulators, and runs ceil(samples / ranks)
    windows per step, so its peak is the one-GPU peak with the micro-batch capped at its share: more GPUs
    never lower the memory a rank needs, only the time;
  * ``shard``: the decoder layers' fp32 master weights and fp32 gradient shards are divided over the ranks
    (``memory.sharded_breakdown``: a model of FSDP2's allocations built on the one-GPU meta run, not a
    trace of FSDP itself); activations are not sharded. Only fp32 accumulators, no compaction;
  * projected time: the step's tokens divided over the ranks at ``throughput`` each (ideal scaling: the
    once-per-step reduction and FSDP's gathers are not counted);
  * :func:`scaling_table`: the per-GPU peak at micro-batch 1 (the least a rank can need) for 1, 2, 4, 8, …
    GPUs, with and without sharding: how many GPUs a model needs at all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from nestprune.arch import GqaMode, arch_from_config
from nestprune.errors import NestpruneError
from nestprune.rank.memory import (
    ACCUMULATORS,
    MemoryBreakdown,
    PeakEstimate,
    ShardSizes,
    StepFn,
    accumulator_model,
    grad_param_names,
    meta_model,
    predict_peak,
    sharded_breakdown,
)

PLAN_VERSION = 3
CPU_MICRO_BATCH_TOKENS = 8192  # the largest micro-batch ``auto`` picks on a CPU, in tokens
AUTO_ACCUMULATORS = ("fp32", "bf16-stochastic", "fp32-host")  # preference order
DEFAULT_HEADROOM = 0.10
GiB = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_memory(text: str | int) -> int:
    """Bytes from '80GiB', '80 GB', '79.6gib', '1024' (bytes). GB/MB are decimal, GiB/MiB binary."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise NestpruneError(f"cannot read a memory size from {text!r}; write e.g. 80GiB, 80GB or 24000MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise NestpruneError(f"memory size {text!r} must be positive")
    return n


def format_bytes(n: int | float) -> str:
    """GiB with one decimal from 1 GiB up; MiB or KiB below (a small model's plan stays readable)."""
    for unit, name in ((GiB, "GiB"), (1 << 20, "MiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n / 1024:.1f} KiB"


def detect_device_memory(device: torch.device | int | None = None) -> int | None:
    """Total memory of a CUDA device (default: device 0), or None without one."""
    if not torch.cuda.is_available():
        return None
    index = device.index if isinstance(device, torch.device) else device
    return int(torch.cuda.get_device_properties(index or 0).total_memory)


def available_host_memory() -> int:
    """Memory a CPU build may use: MemAvailable (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def measure_device_throughput(config: Mapping[str, Any], dtype: torch.dtype, micro_batch: int, seq_len: int,
                              gqa_mode: GqaMode, device: torch.device | str, repeats: int = 3) -> float:
    """Tokens/s of the build's step (forward + backward, the first step's gradients) on ``device``, on the
    model of ``config`` with random weights (``memory.measure_throughput``). Frees the model after."""
    from nestprune.rank.memory import measure_throughput, model_from_config

    model = model_from_config(config, dtype, device)
    try:
        return measure_throughput(model, micro_batch=micro_batch, seq_len=seq_len,
                                  params_requiring_grad=grad_param_names(config, gqa_mode), repeats=repeats)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def step_costs(config: Mapping[str, Any], *, steps: int, r_max: float, max_sparsity: float | None = None,
               skip_first_frac: float = 0.1, skip_last: int = 1, gqa_mode: GqaMode = "query",
               compact: bool = True) -> list[float]:
    """Per-token work of each step of a GISP run, relative to the dense model (1.0 = dense), until the
    schedule stops (``steps`` steps, or ``max_sparsity`` reached).

    Work per token is taken as proportional to the weights a token meets: the decoder layers' plus the
    output layer's (attention over the context and elementwise work are left out). Step t runs on the
    model left by step t-1, whose removed share is r_(t-1)·N structures, at the mean cost of a prunable
    structure (the first steps remove the cheapest-scoring ones; no finer model is attempted). Without
    compaction every step costs 1.0."""
    from nestprune.arch import Structures
    from nestprune.rank.schedule import threshold_k

    arch = arch_from_config(config)
    st = Structures(arch, gqa_mode)
    layers = arch.prunable_layers(skip_first_frac, skip_last)
    decoder = arch.num_layers * arch.layer_params()
    head = arch.vocab_size * arch.hidden_size
    per_layer = st.attention_units * st.cost(st.attention_kind) + arch.intermediate_size * st.cost("channel")
    prunable = len(layers) * per_layer
    n_all = arch.num_layers * (st.attention_units + arch.intermediate_size)
    n_prunable = len(layers) * (st.attention_units + arch.intermediate_size)
    delta = r_max / (steps - 1) if steps > 1 else r_max
    costs, removed = [], 0.0
    for t in range(10 * steps if max_sparsity is not None else steps):
        costs.append((head + decoder - (removed if compact else 0.0)) / (head + decoder))
        structures = min(n_prunable, threshold_k(n_all, min(1.0, t * delta)))
        removed = prunable * structures / max(1, n_prunable)
        if max_sparsity is not None and (removed / decoder >= max_sparsity or t * delta >= 1.0):
            break
        if max_sparsity is None and t + 1 >= steps:
            break
    return costs


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, dtype)
    raise NestpruneError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPeak:
    """One row of :func:`scaling_table`: the per-GPU peak of a build over ``ranks`` GPUs at micro-batch 1."""

    ranks: int
    shard: bool
    peak_bytes: int
    accumulator: str
    fits: bool


@dataclass(frozen=True)
class BuildPlan:
    """What a build will need on one device (per GPU, for a build over ``ranks`` GPUs), and what was chosen.
    Bytes are ints."""

    peak_bytes: int
    fits: bool
    micro_batch: int
    accumulator: str
    breakdown: MemoryBreakdown
    device_memory: int
    headroom: float
    dtype: str
    samples: int
    seq_len: int
    steps: int
    host_bytes: int  # host memory the accumulator mode needs (fp32-host)
    model_type: str
    parameters: int
    throughput: float | None = None  # tokens/s of the build step on this device, given or measured
    throughput_source: str = "none"  # "given" | "measured" | "none"
    steps_run: int | None = None  # steps until the schedule stops (max sparsity reached), None: ``steps``
    step_cost: float = 1.0  # mean per-token work of those steps relative to the dense model (compaction)
    ranks: int = 1  # GPUs (torchrun ranks) the build runs on; every byte figure is per GPU
    shard: bool = False  # decoder layers sharded over the ranks (FSDP2)
    scaling: tuple[RankPeak, ...] = ()  # per-GPU peaks for other GPU counts (:func:`scaling_table`)

    @property
    def usable_memory(self) -> int:
        return int(self.device_memory * (1.0 - self.headroom))

    @property
    def tokens_per_step(self) -> int:
        return self.samples * self.seq_len

    @property
    def samples_per_rank(self) -> int:
        """Windows each rank runs per step (the largest share)."""
        return math.ceil(self.samples / self.ranks)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches per step on each rank (the largest share)."""
        return math.ceil(self.samples_per_rank / self.micro_batch)

    @property
    def projected_seconds_dense(self) -> float | None:
        """Time of the steps run at the dense model's ``throughput`` per GPU (no compaction), the tokens
        divided over the ranks."""
        if not self.throughput:
            return None
        return (self.steps_run or self.steps) * self.tokens_per_step / (self.throughput * self.ranks)

    @property
    def projected_seconds(self) -> float | None:
        """Time of the steps run, each at the dense throughput scaled by its work left after compaction."""
        dense = self.projected_seconds_dense
        return None if dense is None else dense * self.step_cost

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["breakdown"] = self.breakdown.as_dict()
        d.update(plan_version=PLAN_VERSION, usable_memory=self.usable_memory, tokens_per_step=self.tokens_per_step,
                 samples_per_rank=self.samples_per_rank, micro_batches_per_step=self.micro_batches_per_step,
                 projected_seconds=self.projected_seconds, projected_seconds_dense=self.projected_seconds_dense)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildPlan:
        if d.get("plan_version") != PLAN_VERSION:
            raise NestpruneError(f"plan version {d.get('plan_version')!r} is not {PLAN_VERSION}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["breakdown"] = MemoryBreakdown(**d["breakdown"])
        kw["scaling"] = tuple(RankPeak(**row) for row in d.get("scaling", ()))
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> BuildPlan:
        return cls.from_dict(json.loads(text))

    def verdict(self) -> str:
        """One line: fits, or what it needs and what would fit."""
        if self.fits:
            return (f"fits: peak {format_bytes(self.peak_bytes)} of {format_bytes(self.usable_memory)} usable "
                    f"(micro-batch {self.micro_batch}, {self.accumulator} accumulators)")
        return (f"does not fit: needs {format_bytes(self.peak_bytes)} at micro-batch {self.micro_batch} with "
                f"{self.accumulator} accumulators, {format_bytes(self.usable_memory)} usable of "
                f"{format_bytes(self.device_memory)} (a device with at least "
                f"{format_bytes(self.peak_bytes / (1.0 - self.headroom))} would fit)")

    def where(self) -> str:
        """'1 GPU', '4 GPUs (data parallel)', '8 GPUs (--shard)'."""
        if self.ranks == 1 and not self.shard:
            return "1 device"
        return f"{self.ranks} GPUs ({'--shard' if self.shard else 'data parallel'}), per GPU"

    def summary(self) -> str:
        b = self.breakdown
        lines = [
            f"plan: {self.model_type}, {self.parameters / 1e9:.2f}B parameters, {self.dtype}, {self.where()}: "
            f"device {format_bytes(self.device_memory)} ({format_bytes(self.usable_memory)} usable, "
            f"{self.headroom:.0%} headroom)",
            f"peak {format_bytes(self.peak_bytes)} = weights {format_bytes(b.weights)} + accumulators "
            f"{format_bytes(b.accumulators)} + activations {format_bytes(b.activations)} + logits "
            f"{format_bytes(b.logits)} + workspace {format_bytes(b.workspace)}",
            f"micro-batch {self.micro_batch} x {self.seq_len} tokens, {self.micro_batches_per_step} micro-batches per "
            f"{self.tokens_per_step:,}-token step" + (f" on each of {self.ranks} ranks" if self.ranks > 1 else "")
            + f"; {self.accumulator} accumulators ("
            + ("fp32 gradient shards (FSDP2); no compaction" if self.shard
               else ACCUMULATORS[self.accumulator].description) + ")",
        ]
        if self.host_bytes:
            lines.append(f"host memory for accumulators: {format_bytes(self.host_bytes)}")
        steps = self.steps_run or self.steps
        if self.projected_seconds is not None and self.projected_seconds_dense is not None:
            lines.append(f"projected: {steps} steps at {self.throughput:,.0f} tokens/s ({self.throughput_source}, "
                         + (f"dense, per GPU on {self.ranks} GPUs, ideal scaling" if self.ranks > 1 else "dense")
                         + (f") = {self.projected_seconds / 3600:.2f} h (--shard builds without compaction); " if self.shard
                            else f") = {self.projected_seconds / 3600:.2f} h with compaction (mean step "
                            f"{self.step_cost:.2f} of dense), {self.projected_seconds_dense / 3600:.2f} h without; ")
                         + "a projection, not a measurement")
        else:
            lines.append(f"projected time: no throughput figure ({steps} steps of {self.tokens_per_step:,} tokens; "
                         "give --throughput TOKENS_PER_S)")
        if self.scaling:
            lines.append(scaling_summary(self.scaling, self.usable_memory))
        lines.append(self.verdict())
        return "\n".join(lines)


def _largest_fitting(peak: Callable[[int], int], usable: int, limit: int) -> int | None:
    """Largest b in [1, limit] with peak(b) <= usable, for a non-decreasing ``peak``; None if not even 1.

    A step's peak is the largest of many live-byte totals, each affine in the micro-batch, so it is
    convex in b. Without a failing point yet, the slope from 1 is extrapolated; with one, the chord
    between the largest fitting and smallest failing b lies above the peak, so where it crosses
    ``usable`` fits (regula falsi). Each probe narrows (lo, hi), so the search ends.
    """
    if peak(1) > usable:
        return None
    lo, hi = 1, limit + 1  # peak(lo) fits; hi fails (limit + 1: none known yet)
    while hi - lo > 1:
        if hi == limit + 1:
            a = lo if lo > 1 else 2
            slope = (peak(a) - peak(1)) / (a - 1)
            x = limit if slope <= 0 else 1 + int((usable - peak(1)) // slope)
        else:
            x = lo + (usable - peak(lo)) * (hi - lo) // (peak(hi) - peak(lo))
        probe = min(max(x, lo + 1), hi - 1)
        if peak(probe) <= usable:
            lo = probe
        else:
            hi = probe
    return lo


class Estimator:
    """One-GPU peaks of a build step of ``config``'s model, predicted on the meta device, each (accumulator,
    micro-batch) once; and their per-rank form under ``--shard``. Shared by the plans of several GPU counts."""

    def __init__(self, config: Mapping[str, Any], dtype: torch.dtype, seq_len: int, gqa_mode: GqaMode = "query",
                 step_fn: StepFn | None = None):
        self.config, self.dtype, self.seq_len, self.gqa_mode, self.step_fn = config, dtype, seq_len, gqa_mode, step_fn
        self.model = meta_model(config, dtype)
        self.names = grad_param_names(config, gqa_mode)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self._cache: dict[tuple[str, int], PeakEstimate] = {}
        self._sizes: ShardSizes | None = None

    def single(self, mode: str, b: int) -> PeakEstimate:
        """One micro-batch: every micro-batch of a step peaks alike."""
        if (mode, b) not in self._cache:
            self._cache[mode, b] = predict_peak(self.config, dtype=self.dtype, micro_batch=b, seq_len=self.seq_len,
                                                step_fn=self.step_fn, params_requiring_grad=self.names,
                                                accumulator=mode, model=self.model, micro_batches=1,
                                                gqa_mode=self.gqa_mode)
        return self._cache[mode, b]

    def estimate(self, mode: str, b: int, ranks: int = 1, shard: bool = False) -> PeakEstimate:
        """The per-GPU peak: the one-GPU peak, or under ``shard`` its sharded form over ``ranks``."""
        one = self.single(mode, b)
        if not shard:
            return one
        if self._sizes is None:
            self._sizes = ShardSizes.of(self.model, self.config, self.gqa_mode)
        parts = sharded_breakdown(one.breakdown, self._sizes, self.dtype.itemsize, ranks)
        return PeakEstimate(peak_bytes=parts.total, breakdown=parts, micro_batch=b, seq_len=self.seq_len,
                            accumulator=mode, micro_batch_peaks=(parts.total,), host_bytes=0)


def _modes(dt: torch.dtype, accumulator: str, shard: bool) -> tuple[str, ...]:
    if shard:
        if accumulator not in ("auto", "fp32"):
            raise NestpruneError(f"a sharded build accumulates fp32 gradient shards; accumulator {accumulator!r} "
                                 "does not apply")
        return ("fp32",)
    if accumulator == "auto":
        return AUTO_ACCUMULATORS if dt != torch.float32 else ("fp32",)
    return (accumulator_model(accumulator).name,)


def plan_build(config: Mapping[str, Any], device_memory: int | str, *, samples: int, seq_len: int,
               dtype: torch.dtype | str, steps: int, batch_size: int | str = "auto", accumulator: str = "auto",
               throughput: float | None = None, step_fn: StepFn | None = None, gqa_mode: GqaMode = "query",
               headroom: float = DEFAULT_HEADROOM, ranks: int = 1, shard: bool = False,
               max_micro_batch: int | None = None, r_max: float = 0.7, max_sparsity: float | None = None,
               skip_first_frac: float = 0.1, skip_last: int = 1, compact: bool = True,
               throughput_source: str | None = None, estimator: Estimator | None = None,
               scaling: tuple[RankPeak, ...] = ()) -> BuildPlan:
    """Plan a build of ``config``'s model on devices of ``device_memory`` bytes (or '80GiB') each: one, or
    ``ranks`` GPUs (data parallel, or ``shard``-ed).

    ``max_micro_batch`` caps ``auto`` (a CPU build passes ``CPU_MICRO_BATCH_TOKENS // seq_len``); the
    schedule arguments (``r_max``, ``max_sparsity``, the layer skip, ``compact``) only shape the projected
    time. ``estimator``: reuse the meta model and peaks of another plan of the same model and sequence length."""
    device_memory = parse_memory(device_memory)
    dt = _dtype(dtype)
    if samples < 1 or seq_len < 2 or steps < 1:
        raise NestpruneError("a plan needs samples >= 1, seq_len >= 2 and steps >= 1")
    if not 0.0 <= headroom < 1.0:
        raise NestpruneError("headroom must be in [0, 1)")
    if throughput is not None and throughput <= 0:
        raise NestpruneError("throughput must be a positive number of tokens per second")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise NestpruneError(f"ranks must be a positive number of GPUs, not {ranks!r}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise NestpruneError(f"batch size must be 'auto' or a positive integer, not {batch_size!r}")
    modes = _modes(dt, accumulator, shard)
    arch = arch_from_config(config)
    est = estimator or Estimator(config, dt, seq_len, gqa_mode, step_fn)
    usable = int(device_memory * (1.0 - headroom))
    share = math.ceil(samples / ranks)  # each rank's windows per step
    limit = max(1, min(share, max_micro_batch or share))

    def estimate(mode: str, b: int) -> PeakEstimate:
        return est.estimate(mode, b, ranks, shard)

    chosen: PeakEstimate | None = None
    for mode in modes:
        if batch_size == "auto":
            if estimate(mode, limit).peak_bytes <= usable:  # the cap fits: no search
                chosen = estimate(mode, limit)
            else:
                b = _largest_fitting(lambda b, mode=mode: estimate(mode, b).peak_bytes, usable, limit)
                chosen = estimate(mode, b or 1)
        else:
            chosen = estimate(mode, batch_size)
        if chosen.peak_bytes <= usable:
            break
    assert chosen is not None
    costs = step_costs(config, steps=steps, r_max=r_max, max_sparsity=max_sparsity, skip_first_frac=skip_first_frac,
                       skip_last=skip_last, gqa_mode=gqa_mode, compact=compact and not shard)
    return BuildPlan(
        peak_bytes=chosen.peak_bytes, fits=chosen.peak_bytes <= usable, micro_batch=chosen.micro_batch,
        accumulator=chosen.accumulator, breakdown=chosen.breakdown, device_memory=device_memory, headroom=headroom,
        dtype=str(dt).removeprefix("torch."), samples=samples, seq_len=seq_len, steps=steps,
        host_bytes=chosen.host_bytes, model_type=arch.model_type, parameters=est.parameters, throughput=throughput,
        throughput_source=throughput_source or ("given" if throughput else "none"), steps_run=len(costs),
        step_cost=sum(costs) / len(costs), ranks=ranks, shard=shard, scaling=tuple(scaling),
    )


SCALING_RANKS = (1, 2, 4, 8, 16, 32, 64)


def scaling_table(estimator: Estimator, device_memory: int | str, *, accumulator: str = "auto",
                  headroom: float = DEFAULT_HEADROOM, ranks: tuple[int, ...] = SCALING_RANKS) -> tuple[RankPeak, ...]:
    """The per-GPU peak at micro-batch 1 (the least memory a rank can do with) for each GPU count in ``ranks``,
    data parallel and sharded; a row fits when that peak fits the usable memory. Data-parallel rows are
    all alike (each rank holds the whole model): more GPUs only shorten the build."""
    usable = int(parse_memory(device_memory) * (1.0 - headroom))
    rows = []
    for shard in (False, True):
        modes = _modes(estimator.dtype, "auto" if shard else accumulator, shard)
        for n in ranks:
            for mode in modes:  # the first accumulator mode that fits, else the last (the least memory)
                e = estimator.estimate(mode, 1, n, shard)
                if e.peak_bytes <= usable:
                    break
            rows.append(RankPeak(ranks=n, shard=shard, peak_bytes=e.peak_bytes, accumulator=e.accumulator,
                                 fits=e.peak_bytes <= usable))
    return tuple(rows)


def scaling_summary(rows: tuple[RankPeak, ...], usable: int) -> str:
    """The table as text: per-GPU peak at micro-batch 1 by GPU count, and the fewest GPUs that do."""
    counts = sorted({r.ranks for r in rows})
    cell = {(r.ranks, r.shard): r for r in rows}
    width = max(len(f"{n}") for n in counts) + 6
    lines = [f"per-GPU peak at micro-batch 1 by GPU count ({format_bytes(usable)} usable):",
             ("  GPUs         " + "".join(f"{n:>{width - 1}} " for n in counts)).rstrip()]
    for shard, label in ((False, "data parallel"), (True, "--shard      ")):
        lines.append(f"  {label}" + "".join(f"{cell[n, shard].peak_bytes / GiB:>{width - 1}.1f}"
                                            + (" " if cell[n, shard].fits else "!") if (n, shard) in cell
                                            else " " * width for n in counts).rstrip())
    least = [r.ranks for r in rows if r.fits]
    shard_least = [r.ranks for r in rows if r.fits and r.shard]
    if any(r.fits and not r.shard for r in rows):
        lines.append("  ('!': does not fit) one GPU fits the build; more GPUs, data parallel, shorten it")
    elif shard_least:
        lines.append(f"  ('!': does not fit) the build needs --shard over at least {min(shard_least)} GPUs")
    elif not least:
        lines.append(f"  ('!': does not fit) not even --shard over {max(counts)} GPUs holds the build")
    return "\n".join(lines)
