"""A build over several processes: ``torchrun ... -m nestprune build`` (data parallel) and ``--shard`` (FSDP2).

**Launch.** torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (one node or many:
``--nnodes`` and the rendezvous options are torchrun's). :func:`launch_env` reads them; :func:`launch` puts
each rank on ``cuda:LOCAL_RANK`` (or the CPU) and opens the process group, NCCL on CUDA and gloo on the
CPU, with a timeout (``NESTPRUNE_DIST_TIMEOUT`` seconds, default 1800) so that a rank that never arrives
ends the run instead of hanging it. Without torchrun's variables a build is the one process it always was
(:data:`SINGLE`: no communication at all).

**Split.** Every rank draws the same calibration windows (seeded) and cuts them into the same micro-batches
of ``--batch-size``; rank r runs the r-th contiguous share of the micro-batches of each step
(:meth:`Group.split`, shares differing by at most one). Each micro-batch is the very one a one-process
build with that batch size runs, so its gradient is the same to the bit, and an objective's loss carries
the global normalisation (``objectives/base.py``: micro-batch losses add up to the objective), so the ranks'
sums add up to the one-process sum: every window once, nothing scaled twice.

**Which reduction is exact.** GISP's raw score of a structure is S = Σ_{w ∈ structure} |w · G_w|, with
G = Σ_windows ∇ℓ the gradient over ALL the step's windows (``score.py``): the absolute value is taken per
weight, after the sum over windows and before the sum over the structure's weights. Rank r holds only
G⁽ʳ⁾, its windows' part, and |w·(G⁽¹⁾ + G⁽²⁾)| ≠ |w·G⁽¹⁾| + |w·G⁽²⁾|, so per-structure partial scores
Σ_w |w·G⁽ʳ⁾| are not additive. Neither are signed partial sums Σ_w w·G⁽ʳ⁾ (those would add up exactly,
but only a score whose absolute value came after the sum over the structure's weights could be made
from them; GISP's comes before). What adds up exactly is the gradient: G = Σ_r G⁽ʳ⁾. Hence:

* data parallel all-reduces the accumulated gradients, once per step, after the last micro-batch
  (:meth:`Group.reduce`: each rank's accumulators are summed in place, as fp32), and every rank scores the
  same G with the same weights. The cost is one all-reduce of the scored weights' gradients per step (the
  per-structure vectors would be ~1000x smaller, but are not exact);
* under ``--shard`` FSDP2 sums the gradient over the ranks itself (a reduce-scatter after each
  micro-batch's backward), and each rank is left with the complete G for ITS slice of every weight. There
  the absolute value is taken on complete sums, and per-structure sums ARE additive over disjoint slices
  of a structure's weights: each rank sums |w·G| over its slice, per unit (:func:`sharded_scores`), and
  only those per-unit vectors (a few per layer, ~10⁵ numbers for a 70B layer) are all-reduced.

**Bits.** A float sum depends on its grouping. One process adds the micro-batch gradients one after another;
N ranks add their shares and then the shares: the same terms grouped differently, so the gradients agree
to fp32 rounding (as with another ``--batch-size``), and are the same to the bit when the groupings
coincide, e.g. 2 ranks with one micro-batch each (a + b = b + a). Under ``--shard`` the shards are cut
along each tensor's pruned axis (rows of q/k/v/gate/up, columns of o/down), so where a unit (a head's
rows, a channel's column) lies wholly in one rank's slice its sum is the one-process sum to the bit
(``score.per_unit`` sums a unit the same way whatever else the tensor holds) and the other ranks add exact
zeros; a unit cut by a shard boundary is summed in two parts (fp32 rounding).

**Agreement and failures.** Every rank makes the same selection from the same reduced scores. After each
step the ranks exchange a sha256 of their scores and removals (:meth:`Group.agree`: 33 bytes per rank); a
difference stops the build on every rank. The same exchange carries failures: a rank that fails tells the
others at their next exchange (:meth:`Group.guard`), and they all exit with its status; only rank 0
prints (progress, the artifact line, the one error line naming the rank that failed).

**Sharding** (:func:`shard_model`). Each decoder layer is one FSDP2 unit (``fully_shard``), its master
weights in fp32 (so that FSDP accumulates the gradient shards in fp32, as ``--accumulator fp32`` does;
forward and backward run in the build's dtype), gradients summed (not averaged) over ranks. Embeddings,
the final norm and the output layer stay whole on every rank: the loss uses the output layer outside any
forward FSDP could hook. Compaction is off under ``--shard``: cutting a sharded tensor means re-sharding
the layer, which FSDP2 does not offer in place; removed structures are zeroed in each rank's shard instead
(:func:`zero_sharded_`), the ``--no-compact`` path, which ranks the same. What it costs: every step runs
the full-width model, the time the plan projects "without compaction".
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nestprune.arch import ArchInfo, Structures, TensorSlice
from nestprune.errors import Fault, NestpruneError
from nestprune.rank.mask import slice_mask
from nestprune.rank.score import fold, per_unit, scored_tensors, weight_times_grad

TIMEOUT_ENV = "NESTPRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait for the slowest rank
MESSAGE_BYTES = 1000  # of an error message carried to the other ranks
REDUCE_CHUNK = 1 << 24  # elements reduced at once where a buffer goes through fp32 on the device
PAD = "nestprune_padding"  # marks a zero-weighted repeat of a micro-batch (--shard: equal shares)


# ---------------------------------------------------------------------------------------------
# torchrun's environment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Where this process sits among the ranks torchrun started."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def launch_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place from torchrun's variables; None when not launched by torchrun."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        raise NestpruneError("torchrun's environment is incomplete: RANK and WORLD_SIZE (and LOCAL_RANK, "
                             "LOCAL_WORLD_SIZE) must be integers; launch with torchrun") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise NestpruneError(f"torchrun's environment is inconsistent: RANK {rank}, WORLD_SIZE {world}, "
                             f"LOCAL_RANK {local_rank}, LOCAL_WORLD_SIZE {local_world}")
    return Launch(rank, world, local_rank, local_world)


def rank_device(device: torch.device, where: Launch | None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``--device auto``/``cuda`` under torchrun."""
    if where is None or device.type != "cuda":
        return device
    if device.index is not None and where.local_world > 1:
        raise NestpruneError(f"--device {device} names one GPU, but torchrun started {where.local_world} ranks on "
                             "this node; give --device cuda (each rank takes cuda:LOCAL_RANK)")
    index = where.local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise NestpruneError(f"rank {where.rank} needs cuda:{index}, but this node has "
                             f"{torch.cuda.device_count()} GPU(s); start at most that many ranks per node")
    return torch.device("cuda", index)


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise NestpruneError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Failures every rank hears of
# ---------------------------------------------------------------------------------------------


class PeerFailed(NestpruneError):
    """Another rank failed; raised on the ranks that did not, with its message and exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Disagreement(Fault):
    """The ranks computed different things (raised on every rank at once)."""


def _exit_code(e: BaseException) -> int:
    if isinstance(e, NestpruneError):
        return e.exit_code
    return 1


def _message(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, NestpruneError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# The group
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """The ranks of one build and what they do together. The default is the single process: every method
    is then a no-op (``split`` gives everything, ``share`` the objective itself)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: str = "cpu"  # where collectives' tensors live: the rank's CUDA device under NCCL
    shard: bool = False
    timeout: float = DEFAULT_TIMEOUT

    @property
    def main(self) -> bool:
        """Rank 0: prints, writes the artifact."""
        return self.rank == 0

    # the split -----------------------------------------------------------------------------------
    def split(self, n: int) -> range:
        """This rank's contiguous share of ``n`` micro-batches (the first ``n % world`` ranks take one more)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return range(lo, lo + base + (self.rank < extra))

    def share(self, objective: Any) -> Any:
        """The objective as this rank runs it (:class:`Share`); the objective itself on one process."""
        return objective if self.world == 1 else Share(objective, self)

    # the reduction -------------------------------------------------------------------------------
    def reduce(self, loss: float, grads: Mapping[str, torch.Tensor]) -> float:
        """After a rank's micro-batches: the step's loss over every rank, and (data parallel) each accumulated
        gradient summed over the ranks in place. First an exchange, where a rank that failed during its
        micro-batches says so (no rank enters the all-reduce alone)."""
        if self.world == 1:
            return loss
        self.agree("the end of the calibration pass")
        if not self.shard:  # --shard: FSDP has summed the gradient shards already
            for g in grads.values():
                self._all_reduce_(g)
        total = torch.tensor([loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())

    def _all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the ranks in place: directly when the backend takes it as it is (fp32 on the
        collective device), else through fp32 chunks on that device (bf16 buffers: summed in fp32 and
        rounded once, to nearest; host buffers under NCCL)."""
        if t.dtype == torch.float32 and t.device == torch.device(self.device) and t.is_contiguous():
            dist.all_reduce(t)
            return
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        for lo in range(0, flat.numel(), REDUCE_CHUNK):
            part = flat[lo : lo + REDUCE_CHUNK].to(self.device, torch.float32)
            dist.all_reduce(part)
            flat[lo : lo + REDUCE_CHUNK].copy_(part)
        if not t.is_contiguous():
            t.copy_(flat.view(t.shape))

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over the ranks (through the collective device); returns it."""
        if self.world > 1:
            moved = t.to(self.device)
            dist.all_reduce(moved)
            t.copy_(moved)
        return t

    # agreement and failures ----------------------------------------------------------------------
    def exchange(self, code: int, payload: bytes, timeout: float | None = None) -> list[tuple[int, bytes]]:
        """Every rank's (status, payload): one all-gather of a small fixed-size record per rank."""
        size = 8 + MESSAGE_BYTES
        payload = payload[:MESSAGE_BYTES]
        record = struct.pack("<ii", code, len(payload)) + payload
        mine = torch.zeros(size, dtype=torch.uint8)
        mine[: len(record)] = torch.frombuffer(bytearray(record), dtype=torch.uint8)
        out = torch.zeros(self.world * size, dtype=torch.uint8, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        work = gather(out, mine.to(self.device), async_op=True)
        work.wait(datetime.timedelta(seconds=timeout or self.timeout))
        data = out.cpu().numpy().tobytes()
        got = []
        for r in range(self.world):
            c, n = struct.unpack_from("<ii", data, r * size)
            got.append((c, data[r * size + 8 : r * size + 8 + n]))
        return got

    def agree(self, what: str, digest: bytes = b"") -> None:
        """A meeting point of every rank: raises :class:`PeerFailed` if a rank reports a failure instead, and
        :class:`Disagreement` if the ranks' ``digest`` of ``what`` differ."""
        if self.world == 1:
            return
        got = self.exchange(0, digest)
        for r, (code, message) in enumerate(got):
            if code != 0:
                raise PeerFailed(f"rank {r}: {message.decode('utf-8', 'replace')}", code)
        odd = [r for r, (_, d) in enumerate(got) if d != got[0][1]]
        if odd:
            raise Disagreement(f"the ranks disagree on {what} (rank {odd[0]} differs from rank 0); the ranks must "
                               "read the same model and data, with the same software")

    def agree_step(self, step: int, norm: np.ndarray, raw: np.ndarray, removed: np.ndarray) -> None:
        """Every rank removes the same structures at step ``step``, from the same scores (a sha256 of them)."""
        if self.world > 1:
            h = hashlib.sha256()
            for a in (norm, raw, np.asarray(removed, dtype=np.int64)):
                h.update(np.ascontiguousarray(a).tobytes())
            self.agree(f"the scores and removals of step {step}", h.digest())

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a rank's whole build: a failure here is told to the other ranks at their next
        :meth:`agree` (they then raise :class:`PeerFailed` with its message and status). If the others cannot
        be told (they are stuck, or gone), the failure is marked ``unreported`` for its rank to print."""
        try:
            yield
        except (PeerFailed, Disagreement):
            raise  # every rank knows already
        except Exception as e:
            if isinstance(e, getattr(dist, "DistError", ())):  # the group itself failed (a timeout): telling fails too
                e.unreported = True  # type: ignore[attr-defined]
            elif self.world > 1:
                try:
                    self.exchange(_exit_code(e), _message(e).encode(), timeout=self.timeout)
                except Exception:
                    e.unreported = True  # type: ignore[attr-defined]
            raise

    def barrier(self) -> None:
        self.agree("a barrier")

    def stagger(self) -> Iterator[None]:
        """Yield once, to the ranks of this node one after the other (the others wait): one model read into
        host memory at a time per node (``--shard`` loads each rank's copy before sharding it)."""
        for turn in range(self.local_world):
            if turn == self.local_rank:
                yield
            self.barrier()


SINGLE = Group()


@contextlib.contextmanager
def launch(device: torch.device, where: Launch | None, shard: bool = False) -> Iterator[Group]:
    """The group of this build: :data:`SINGLE` without torchrun; else the process group, opened here (NCCL
    on CUDA, gloo on the CPU, with the timeout) and closed at the end."""
    if where is None:
        if shard:
            raise NestpruneError("--shard splits the model over several processes: launch the build with "
                                 "torchrun --nproc-per-node N -m nestprune build ... --shard")
        yield SINGLE
        return
    timeout = timeout_seconds()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    opened = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except (ValueError, RuntimeError) as e:
            raise NestpruneError(f"cannot open the process group ({backend}): {' '.join(str(e).split())}") from None
        opened = True
    if dist.get_world_size() != where.world or dist.get_rank() != where.rank:
        raise NestpruneError("the process group does not match torchrun's RANK/WORLD_SIZE")
    group = Group(rank=where.rank, world=where.world, local_rank=where.local_rank, local_world=where.local_world,
                  device=str(device), shard=shard, timeout=timeout)
    failed = False
    try:
        yield group
    except BaseException:
        failed = True
        raise
    finally:
        if opened and not failed:  # after a failure the group may be broken: the process exits instead
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Each rank's share of the micro-batches
# ---------------------------------------------------------------------------------------------


class Share:
    """An objective as one rank runs it: its :meth:`Group.split` share of each pass's micro-batches. Under
    ``--shard`` every rank must take part in every forward and backward (FSDP gathers the weights there),
    so a smaller share is padded to the largest with zero-weighted repeats of a micro-batch (their
    gradient is exactly zero for a finite loss)."""

    def __init__(self, objective: Any, group: Group):
        self.objective, self.group = objective, group
        self.name = objective.name

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        batches = list(self.objective.batches(batch_size))
        mine = self.group.split(len(batches))
        yield from (batches[i] for i in mine)
        if self.group.shard and batches:
            filler = batches[mine.start if len(mine) else 0]
            for _ in range(math.ceil(len(batches) / self.group.world) - len(mine)):
                yield {**filler, PAD: torch.ones(())}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if PAD in batch:
            return self.objective.loss(model, {k: v for k, v in batch.items() if k != PAD}) * 0.0
        return self.objective.loss(model, batch)

    def provenance(self) -> dict[str, Any]:
        return self.objective.provenance()


# ---------------------------------------------------------------------------------------------
# --shard: FSDP2 over the decoder layers
# ---------------------------------------------------------------------------------------------


def shard_range(length: int, group: Group) -> tuple[int, int]:
    """[lo, hi) of this rank's shard of a dimension of ``length`` (FSDP2 cuts as ``torch.chunk``: pieces of
    ceil(length / world), the last ones shorter or empty)."""
    chunk = -(-length // group.world)
    lo = min(length, group.rank * chunk)
    return lo, min(length, lo + chunk)


def _layers(model: torch.nn.Module, arch: ArchInfo) -> torch.nn.ModuleList:
    return model.get_submodule(arch.fam.layers_path)


def shard_model(model: torch.nn.Module, arch: ArchInfo, group: Group, dtype: torch.dtype, mesh: Any) -> None:
    """Wrap each decoder layer of ``model`` (loaded on the CPU in ``dtype``) with FSDP2 on ``mesh``, its sliced
    tensors sharded along their pruned axis (the rest along dim 0), master weights in fp32, compute in
    ``dtype``, gradients summed over the ranks in fp32; then move the rest of the model to the rank's
    device."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    for needed in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms"):
        if not hasattr(FSDPModule, needed):
            raise NestpruneError(f"--shard needs FSDP2's {needed} (torch >= 2.8); this is torch {torch.__version__}")
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    layers = _layers(model, arch)
    in_layers: set[int] = set()
    for block in layers:
        axis = {id(block.get_parameter(name)): arch.segments(name)[0].axis for name in arch.tensor_names()}
        in_layers.update(id(p) for p in block.parameters())
        block.float()
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=mp,
                    shard_placement_fn=lambda p, axis=axis: Shard(axis.get(id(p), 0)))
        block.set_gradient_divide_factor(1.0)  # a sum over ranks, not a mean
        block.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    _move_rest(model, in_layers, torch.device(group.device))


@torch.no_grad()
def _move_rest(model: torch.nn.Module, skip: set[int], device: torch.device) -> None:
    """Move every parameter and buffer outside the sharded layers to ``device`` (tied ones stay tied)."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or id(t) in skip or t.device == device:
                    continue
                if id(t) not in moved:
                    new = t.to(device)
                    moved[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else new
                store[name] = moved[id(t)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _unit_sums(s: TensorSlice, piece: torch.Tensor, offset: int, width: int, out: torch.Tensor) -> None:
    """Add into ``out`` (per unit of the segment) the sums of ``piece``: elements ``offset``.. of the segment
    along its axis. Whole units are summed as the one-process score sums them (``score.per_unit``); a unit
    cut by the shard's edge is summed in part."""
    n = piece.shape[s.axis]
    pos = 0
    head = (-offset) % width
    if head:
        k = min(head, n)
        out[offset // width] += float(piece.narrow(s.axis, 0, k).sum())
        pos = k
    whole = (n - pos) // width
    if whole:
        first = (offset + pos) // width
        out[first : first + whole] += per_unit(s, piece.narrow(s.axis, pos, whole * width), whole, width).double().cpu()
        pos += whole * width
    if pos < n:
        out[(offset + pos) // width] += float(piece.narrow(s.axis, pos, n - pos).sum())


def sharded_scores(model: torch.nn.Module, st: Structures, layers: list[int], grads: Mapping[str, torch.Tensor],
                   group: Group) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Raw scores of ``layers`` (as ``score.layer_scores``) from this rank's shards of the weights and of their
    gradients (complete over the ranks' windows): per segment, per unit, the rank's part of Σ|w·G|; one
    all-reduce of all of them; then folded into structures as one process folds them."""
    arch = st.arch
    counts = arch.counts()
    named = dict(model.named_parameters())
    parts: list[tuple[int, TensorSlice, torch.Tensor]] = []
    for layer in layers:
        for name, segments in scored_tensors(st):
            key = arch.layer_key(layer, name)
            w, g = named[key], grads[key]
            axis = segments[0].axis
            placement = getattr(w, "placements", (None,))[0]
            if getattr(placement, "dim", None) != axis:
                raise NestpruneError(f"internal: {key} is not sharded along its axis {axis}")
            lo, hi = shard_range(arch.tensor_length(name), group)
            local_w, local_g = _local(w), _local(g)
            if local_w.shape[axis] != hi - lo:
                raise NestpruneError(f"internal: {key}'s shard is not rows {lo}:{hi} of its axis")
            metric = weight_times_grad(local_w, local_g) if hi > lo else None
            for s in segments:
                start, length = arch.segment_span(s, counts)
                out = torch.zeros(counts[s.space], dtype=torch.float64)
                a, b = max(lo, start), min(hi, start + length)
                if a < b:
                    _unit_sums(s, metric.narrow(axis, a - lo, b - a), a - start, arch.space_width(s.space), out)
                parts.append((layer, s, out))
            del metric
    if not parts:
        return {}
    flat = group.all_reduce_(torch.cat([p for _, _, p in parts]))
    values: dict[int, list[tuple[TensorSlice, torch.Tensor]]] = {layer: [] for layer in layers}
    for (layer, s, _), total in zip(parts, flat.split([len(p) for _, _, p in parts]), strict=True):
        values[layer].append((s, total))
    return {layer: fold(st, values[layer], counts) for layer in layers}


@torch.no_grad()
def zero_sharded_(model: torch.nn.Module, st: Structures, layer: int, attn_keep: np.ndarray, mlp_keep: np.ndarray,
                  group: Group) -> None:
    """Zero, in this rank's shards, the rows/columns of one layer's removed structures (``mask.zero_removed_``
    on the full tensors, cut to the shard)."""
    arch = st.arch
    named = dict(model.named_parameters())
    for name in arch.tensor_names():
        segments = arch.segments(name)
        keep = torch.cat([m if (m := slice_mask(st, s, attn_keep, mlp_keep)) is not None
                          else torch.ones(arch.segment_length(s), dtype=torch.bool) for s in segments])
        lo, hi = shard_range(len(keep), group)
        local = _local(named[arch.layer_key(layer, name)])
        m = keep[lo:hi].to(device=local.device, dtype=local.dtype)
        if bool(m.all()):
            continue
        local.mul_(m.view(-1, 1) if (segments[0].axis == 0 and local.dim() == 2) else m)
