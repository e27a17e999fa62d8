"""Memory of a build step, measured by running it: on real tensors, or on the meta device to predict it.

The planner never re-implements the build's arithmetic. It runs the step code itself (the loss,
backward, gradient accumulation) under :class:`AllocationTracker`, a ``TorchDispatchMode`` that adds
every new output storage and subtracts it when the storage dies (weak-reference finalizer). On the
meta device no memory is touched, so a Llama-2-7B step is "run" in a second or two on any CPU.

Two things make a meta run match the GPU:
  * attention goes through :func:`fused_attention`, registered with transformers' attention interface,
    which on meta calls the flash kernel's own op (its meta kernel allocates the output and the fp32
    logsumexp, as the CUDA kernel does). SDPA on meta takes the math path and would materialise the
    (B, H, T, T) scores;
  * an attention implementation without a mask function makes transformers skip mask creation, and
    with it the packed-sequence check that calls ``.item()`` (impossible on meta).

Allocations are labelled when they happen: ``weights`` (the model, adopted before the run),
``accumulators`` (gradient buffers and the fp32 ``.grad`` that lives across micro-batches),
``logits`` (any tensor with a vocabulary-sized dim), ``activations`` (made in forward),
``workspace`` (made in backward: activation gradients and temporaries). The labels at the peak
sum to the peak.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nestprune.arch import GqaMode, Structures, arch_from_config, needs_eager_attention
from nestprune.errors import NestpruneError
from nestprune.rank import attention
from nestprune.rank.attention import FUSED_ATTENTION, fused_attention  # noqa: F401 (re-exported)

LABELS = ("weights", "accumulators", "activations", "logits", "workspace")

# Ops whose CPU and CUDA kernels copy a non-contiguous input to a contiguous temporary for the length of
# the call (CUDA: host_softmax's ``input_.contiguous()``), which no dispatch mode sees. The build's loss
# hits it: cross-entropy over ``logits.transpose(1, 2)`` log-softmaxes a transposed fp32 logits tensor.
# op name -> indices of the arguments that are copied.
_CONTIGUOUS_INSIDE = {"aten._log_softmax.default": (0,), "aten._softmax.default": (0,)}

Batch = dict[str, torch.Tensor]
StepFn = Callable[[torch.nn.Module, Batch], Any]


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or result (nested tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
    elif obj is not None and not isinstance(obj, (int, float, bool, str, torch.dtype, torch.device)):
        yield from (x for x in tree_leaves(obj) if isinstance(x, torch.Tensor))


class AllocationTracker(TorchDispatchMode):
    """Bytes of tensor storage alive while a callable runs, and their peak.

    ``with AllocationTracker() as t: fn()`` then ``t.peak_bytes``, ``t.current_bytes`` and
    ``t.peak_breakdown`` (bytes per label at the peak). Only storages made inside the block are
    counted, plus those handed to :meth:`adopt`. A storage is new when an op returns it and none of
    the op's inputs holds it (views and in-place results are not new). Temporaries inside a kernel
    are invisible to a dispatch mode; the known ones that scale with the model (``_CONTIGUOUS_INSIDE``)
    are added for the op's duration. Works on any device, meta included; numbers are storage bytes
    (no allocator rounding or caching).
    """

    def __init__(self, logits_width: int | None = None):
        super().__init__()
        self.logits_width = logits_width
        self._live: dict[int, tuple[int, str, weakref.finalize]] = {}
        self._by_label: dict[str, int] = dict.fromkeys(LABELS, 0)
        self._label: str | None = None
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_breakdown: dict[str, int] = dict(self._by_label)

    # accounting -------------------------------------------------------------------------------
    def _add(self, storage: torch.UntypedStorage, label: str) -> None:
        key = storage._cdata
        n = storage.nbytes()
        if key in self._live:
            old, old_label, fin = self._live[key]
            if old == n:
                return
            self._live[key] = (n, old_label, fin)  # resized in place
            self._move(old_label, n - old)
            return
        fin = weakref.finalize(storage, self._free, key)
        fin.atexit = False
        self._live[key] = (n, label, fin)
        self._move(label, n)

    def _move(self, label: str, delta: int) -> None:
        self._by_label[label] += delta
        self.current_bytes += delta
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_breakdown = dict(self._by_label)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._move(entry[1], -entry[0])

    def _classify(self, t: torch.Tensor) -> str:
        if self._label is not None:
            return self._label
        if self.logits_width and t.dim() >= 2 and self.logits_width in t.shape:
            return "logits"
        return "workspace" if torch._C._current_autograd_node() is not None else "activations"

    # public -----------------------------------------------------------------------------------
    def adopt(self, tensors: Iterable[torch.Tensor], label: str = "weights") -> None:
        """Count storages that already exist (the model's weights), once each."""
        for t in tensors:
            self._add(t.untyped_storage(), label)

    def relabel(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Move the storages of ``tensors`` (already counted) to ``label``."""
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key in self._live:
                n, old, fin = self._live[key]
                self._live[key] = (n, label, fin)
                self._by_label[old] -= n
                self._by_label[label] += n
        if self.current_bytes == self.peak_bytes:
            self.peak_breakdown = dict(self._by_label)

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Label every storage made inside the block ``name``."""
        if name not in LABELS:
            raise ValueError(f"unknown label {name!r}")
        prev, self._label = self._label, name
        try:
            yield
        finally:
            self._label = prev

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self.peak_breakdown = dict(self._by_label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in _tensors((args, kwargs))}
        for t in _tensors(out):
            s = t.untyped_storage()
            if s._cdata not in inputs or s._cdata in self._live:
                self._add(s, self._classify(t))
        for i in _CONTIGUOUS_INSIDE.get(str(func), ()):
            a = args[i]
            if not a.is_contiguous():  # the kernel's temporary lived alongside its output
                label = self._classify(a)
                self._move(label, a.numel() * a.element_size())
                self._move(label, -a.numel() * a.element_size())
        return out

    def __exit__(self, *exc):
        # freeze the numbers: storages that die later are not this run's business
        for _, _, fin in self._live.values():
            fin.detach()
        return super().__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Attention as the fused kernel allocates it, and models built from config.json
# ---------------------------------------------------------------------------------------------


def register_fused_attention() -> str:
    """Register the planner's model of the fused kernel (:func:`attention.fused_attention`) behind the build's
    K/V-gathering wrapper (idempotent); returns its name.

    It gets no mask function on purpose: transformers then passes no mask and runs no
    packed-sequence check, as for a flash kernel on unpadded windows.
    """
    return attention.register(FUSED_ATTENTION)


def skip_packed_check(applies: Callable[[torch.Tensor], bool] = lambda position_ids: True) -> Callable[[], None]:
    """transformers' packed-sequence check (``masking_utils.find_packed_sequence_indices``, run by every
    forward without an attention mask) reads a tensor value: a host sync per forward on a GPU, and an error
    on meta. Until the returned undo is called it answers "not packed" without reading anything wherever
    ``applies(position_ids)`` — right whenever the model makes its own position ids (0..T-1 in every row),
    as for the build's windows. A transformers version without the check is left alone."""
    from transformers import masking_utils

    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        return lambda: None

    def find_packed(position_ids: torch.Tensor):
        return None if applies(position_ids) else original(position_ids)

    def undo() -> None:
        masking_utils.find_packed_sequence_indices = original

    masking_utils.find_packed_sequence_indices = find_packed
    return undo


@contextmanager
def meta_safe_masks() -> Iterator[None]:
    """:func:`skip_packed_check` on meta tensors only (they have no values to read). Only masked attention
    implementations (eager) reach the check; :func:`fused_attention` has no mask function and skips it."""
    undo = skip_packed_check(lambda position_ids: position_ids.device.type == "meta")
    try:
        yield
    finally:
        undo()


def hf_config(config: Mapping[str, Any]):
    """A transformers config object from a config.json dict."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise NestpruneError("config.json has no 'model_type'; is this a Hugging Face model directory?")
    if model_type not in CONFIG_MAPPING:
        raise NestpruneError(f"transformers does not know model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


def model_from_config(config: Mapping[str, Any], dtype: torch.dtype, device: str | torch.device = "meta",
                      seed: int = 0) -> torch.nn.Module:
    """A causal LM built from ``config`` in ``dtype`` on ``device`` (random weights; none on meta), eval mode,
    with the attention the build would run: :func:`fused_attention`, or eager where the config needs it
    (attention soft-capping, which no fused kernel computes)."""
    from transformers import AutoModelForCausalLM

    name = attention.register("eager") if needs_eager_attention(config) else register_fused_attention()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype, attn_implementation=name)
    return model.eval()


def meta_model(config: Mapping[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``config`` on the meta device in ``dtype``: shapes and dtypes, no memory."""
    return model_from_config(config, dtype, "meta")


def grad_param_names(config: Mapping[str, Any], gqa_mode: GqaMode = "query",
                     layers: Iterable[int] | None = None) -> list[str]:
    """The parameters a GISP step differentiates: the scored decoder weights of ``layers``.

    ``None``: every layer, as on the build's first step (the largest set; later steps score only
    the prunable layers).
    """
    arch = arch_from_config(config)
    layers = range(arch.num_layers) if layers is None else layers
    slices = Structures(arch, gqa_mode).scored_slices()
    # fused tensors (Phi-3's qkv_proj) hold several slices: one name each
    return list(dict.fromkeys(arch.layer_key(layer, s.name) for layer in layers for s in slices))


# ---------------------------------------------------------------------------------------------
# Gradient accumulators: what each mode keeps on the device
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccumulatorModel:
    """One way of accumulating a non-fp32 gradient over micro-batches, and its device footprint.

    fp32 parameters always accumulate in a persistent fp32 ``.grad`` (autograd adds each micro-batch's
    gradient into it in place); a mode applies to the others. ``buffer``: dtype of the persistent device
    buffer (None: no device buffer); ``transient``: dtype of what is made per gradient while it is folded
    in, besides the gradient itself (None: nothing; bf16-stochastic works in chunks of at most
    :data:`STOCHASTIC_CHUNK` elements); ``host_bytes``: persistent host memory per element.
    :func:`install_accumulators` implements every mode; the planner runs that same code on meta.
    """

    name: str
    buffer: torch.dtype | None
    transient: torch.dtype | None
    host_bytes: int
    description: str

    @property
    def device_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.itemsize


ACCUMULATORS: dict[str, AccumulatorModel] = {m.name: m for m in (
    # buf.add_(p.grad): the bf16 gradient is widened inside the add, no fp32 copy of it is made (CUDA)
    AccumulatorModel("fp32", torch.float32, None, 0, "fp32 buffers on the device"),
    AccumulatorModel("bf16-stochastic", torch.bfloat16, torch.float32, 0,
                     "bf16 buffers on the device, sums rounded stochastically (fp32 + int32 noise per chunk)"),
    AccumulatorModel("fp32-host", None, None, 4, "fp32 buffers in host memory; each gradient leaves the device"),
    AccumulatorModel("grad", None, None, 0, "plain autograd: gradients summed in .grad in the parameter dtype"),
)}
STOCHASTIC_CHUNK = 1 << 24  # elements folded at once by bf16-stochastic (its transient: 8 bytes each)


def accumulator_model(name: str) -> AccumulatorModel:
    try:
        return ACCUMULATORS[name]
    except KeyError:
        raise NestpruneError(f"unknown accumulator {name!r}; use one of {', '.join(ACCUMULATORS)}") from None


@torch.no_grad()
def stochastic_round_(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` in place to the bf16 grid, up or down at random with the probabilities that make the
    result unbiased (E[round(x)] = x): add uniform noise below the 16 bits bf16 keeps, then drop them.
    ``x.to(torch.bfloat16)`` is then exact."""
    bits = x.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator))
    bits.bitwise_and_(-(1 << 16))  # 0xFFFF0000: sign, exponent and the 7 mantissa bits of bf16
    return x


@torch.no_grad()
def stochastic_add_(buf: torch.Tensor, grad: torch.Tensor, generator: torch.Generator | None = None,
                    chunk: int = STOCHASTIC_CHUNK) -> None:
    """``buf += grad`` for a bf16 ``buf``: summed in fp32, rounded stochastically back to bf16, chunk by chunk."""
    b, g = buf.view(-1), grad.reshape(-1)
    for lo in range(0, b.numel(), chunk):
        s = b[lo : lo + chunk].float()
        s.add_(g[lo : lo + chunk])
        b[lo : lo + chunk].copy_(stochastic_round_(s, generator))
        del s


def _buffer(buffers: dict[str, torch.Tensor], name: str, shape: torch.Size, dtype: torch.dtype,
            device: torch.device | str, pin: bool = False) -> torch.Tensor:
    """The persistent buffer ``name``, zeroed; made (once) when missing or of another shape."""
    buf = buffers.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buffers.pop(name, None)
        del buf
        buf = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
        buffers[name] = buf
    else:
        buf.zero_()
    return buf


@contextmanager
def _untracked() -> Iterator[None]:
    """Allocations that no :class:`AllocationTracker` (or other dispatch mode) sees."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def install_accumulators(params: Mapping[str, torch.nn.Parameter], mode: str,
                         on_grad: Callable[[torch.Tensor], None] | None = None,
                         buffers: dict[str, torch.Tensor] | None = None,
                         generator: torch.Generator | None = None) -> tuple[dict, list]:
    """Set up gradients as the build does; returns (buffers, hooks). ``params`` require grad, and

    * fp32 parameters (any mode but ``grad``) get a zeroed persistent fp32 ``.grad`` that autograd adds
      each micro-batch's gradient into, in place;
    * other parameters are folded into the mode's buffer by a post-accumulate hook that then drops
      ``.grad``: ``fp32`` adds the gradient into an fp32 buffer (widened inside the add),
      ``bf16-stochastic`` into a bf16 buffer with stochastic rounding (``generator``), ``fp32-host``
      into an fp32 buffer in host memory (pinned with CUDA; none on meta, where only the device side is
      modelled);
    * ``grad``: plain autograd.

    ``buffers`` (name -> tensor) are reused when given (zeroed; remade when a shape changed, e.g. after
    compaction) and filled in place, so a build allocates its accumulators once. ``on_grad(p)`` is
    called after a gradient is accumulated into ``p.grad`` (fp32 parameters, mode ``grad``)."""
    spec = accumulator_model(mode)
    buffers = {} if buffers is None else buffers
    hooks = []

    def make_hook(buf: torch.Tensor | None):
        def hook(p: torch.Tensor) -> None:
            if buf is None:  # fp32-host on meta: the gradient leaves the device
                pass
            elif spec.name == "bf16-stochastic":
                stochastic_add_(buf, p.grad, generator)
            elif buf.device == p.grad.device:
                buf.add_(p.grad)
            else:
                buf.add_(p.grad.to(buf.device))
            p.grad = None

        return hook

    for name, p in params.items():
        p.requires_grad_(True)
        if spec.name == "grad" or p.dtype == torch.float32:
            if spec.name != "grad":
                p.grad = _buffer(buffers, name, p.shape, torch.float32, p.device)
            if on_grad is not None:
                hooks.append(p.register_post_accumulate_grad_hook(on_grad))
            continue
        if spec.name == "fp32-host":
            # host memory: not the device's, so made outside any tracker (the plan reports it as host_bytes)
            with _untracked():
                buf = None if p.device.type == "meta" else _buffer(
                    buffers, name, p.shape, torch.float32, "cpu", pin=p.device.type == "cuda")
        else:
            buf = _buffer(buffers, name, p.shape, spec.buffer, p.device)
        hooks.append(p.register_post_accumulate_grad_hook(make_hook(buf)))
    return buffers, hooks


def remove_accumulators(params: Mapping[str, torch.nn.Parameter], hooks: Iterable) -> None:
    """Undo :func:`install_accumulators`: hooks removed, no gradient required or kept (buffers stay with
    their owner)."""
    for h in hooks:
        h.remove()
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None


# ---------------------------------------------------------------------------------------------
# Peak of a step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes alive at the peak, by kind. Their sum is the peak."""

    weights: int = 0
    accumulators: int = 0
    activations: int = 0
    logits: int = 0
    workspace: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PeakEstimate:
    """The peak of ``micro_batches`` micro-batches of one step (weights included), and its parts."""

    peak_bytes: int
    breakdown: MemoryBreakdown
    micro_batch: int
    seq_len: int
    accumulator: str
    micro_batch_peaks: tuple[int, ...]  # the peak inside each micro-batch
    host_bytes: int  # host memory the accumulator mode needs


def lm_step(model: torch.nn.Module, batch: Batch) -> None:
    """One micro-batch of the LM objective: the build's loss (``objectives.lm.lm_loss``), then backward."""
    from nestprune.objectives.lm import lm_loss

    lm_loss(model, batch["input_ids"], 1).backward()


def _vocab_size(model: torch.nn.Module) -> int | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(out.weight.shape[0]) if out is not None else None


def measure_peak(model: torch.nn.Module, *, micro_batch: int, seq_len: int,
                 params_requiring_grad: Iterable[str], accumulator: str = "fp32",
                 step_fn: StepFn | None = None, micro_batches: int = 2,
                 gqa_mode: GqaMode | None = "query") -> PeakEstimate:
    """Run ``micro_batches`` micro-batches of ``step_fn`` on ``model`` (any device, meta included)
    with gradients, accumulators and attention set up as the build does, and return the tracked peak.

    ``gqa_mode="query"`` (the build's default) gathers K/V per query head of a GQA model as the build does
    in that mode (``attention.prepare_attention``); ``None`` runs the model's attention as it is. The model's parameters and buffers count as weights.
    Afterwards no parameter requires grad and the model's attention is as it was.
    """
    if micro_batch < 1 or seq_len < 2 or micro_batches < 1:
        raise NestpruneError("need micro_batch >= 1, seq_len >= 2 and micro_batches >= 1")
    step_fn = step_fn or lm_step
    spec = accumulator_model(accumulator)
    named = dict(model.named_parameters())
    names = list(params_requiring_grad)
    missing = [n for n in names if n not in named]
    if missing:
        raise NestpruneError(f"the model has no parameter {missing[0]!r}")
    params = {n: named[n] for n in names}
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    tracker = AllocationTracker(logits_width=_vocab_size(model))
    tracker.adopt(list(model.parameters()) + list(model.buffers()), "weights")
    hooks: list = []
    peaks: list[tuple[int, dict[str, int]]] = []
    undo = attention.prepare_attention(model, gather=gqa_mode == "query")
    try:
        with meta_safe_masks(), tracker:
            with tracker.label("accumulators"):  # persistent: made once, before the first micro-batch
                buffers, hooks = install_accumulators(params, accumulator)
            for _ in range(micro_batches):
                tracker.reset_peak()
                ids = torch.zeros((micro_batch, seq_len), dtype=torch.long, device=device)
                step_fn(model, {"input_ids": ids})
                del ids
                peaks.append((tracker.peak_bytes, dict(tracker.peak_breakdown)))
            del buffers
    finally:
        remove_accumulators(params, hooks)
        undo()
    peak, parts = max(peaks, key=lambda x: x[0])
    host = spec.host_bytes * sum(p.numel() for p in params.values() if p.dtype != torch.float32)
    return PeakEstimate(peak_bytes=peak, breakdown=MemoryBreakdown(**parts), micro_batch=micro_batch,
                        seq_len=seq_len, accumulator=accumulator, micro_batch_peaks=tuple(p for p, _ in peaks),
                        host_bytes=host)


def predict_peak(config: Mapping[str, Any], *, dtype: torch.dtype, micro_batch: int, seq_len: int,
                 step_fn: StepFn | None = None, params_requiring_grad: Iterable[str] | None = None,
                 accumulator: str = "fp32", micro_batches: int = 2, gqa_mode: GqaMode = "query",
                 model: torch.nn.Module | None = None) -> PeakEstimate:
    """The device peak of a build step on ``config``'s model, predicted on the meta device.

    ``params_requiring_grad`` defaults to the build's first step (every layer's scored weights);
    ``model`` reuses a meta model from :func:`meta_model` across calls.
    """
    model = model if model is not None else meta_model(config, dtype)
    names = grad_param_names(config, gqa_mode) if params_requiring_grad is None else params_requiring_grad
    return measure_peak(model, micro_batch=micro_batch, seq_len=seq_len, params_requiring_grad=names,
                        accumulator=accumulator, step_fn=step_fn, micro_batches=micro_batches, gqa_mode=gqa_mode)


def measure_throughput(model: torch.nn.Module, *, micro_batch: int, seq_len: int,
                       params_requiring_grad: Iterable[str], step_fn: StepFn | None = None,
                       repeats: int = 3) -> float:
    """Tokens per second of ``step_fn`` on a real model (one warm-up micro-batch, then ``repeats``)."""
    step_fn = step_fn or lm_step
    named = dict(model.named_parameters())
    params = [named[n] for n in params_requiring_grad]
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vocab = _vocab_size(model) or 2
    ids = torch.randint(0, vocab, (micro_batch, seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        step_fn(model, {"input_ids": ids})
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step_fn(model, {"input_ids": ids})
        sync()
        seconds = time.perf_counter() - t0
    finally:
        remove_accumulators(dict(enumerate(params)), [])
    return repeats * micro_batch * seq_len / seconds


# ---------------------------------------------------------------------------------------------
# Several GPUs: a rank's share of a sharded build
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSizes:
    """Elements of what ``--shard`` spreads over the ranks (``distributed.shard_model``): every decoder layer's
    parameters (FSDP2 units), the largest layer, and the scored weights (all of them, and the largest
    layer's)."""

    layers: int
    largest_layer: int
    scored: int
    scored_largest_layer: int

    @classmethod
    def of(cls, model: torch.nn.Module, config: Mapping[str, Any], gqa_mode: GqaMode = "query") -> ShardSizes:
        arch = arch_from_config(config)
        named = dict(model.named_parameters())
        blocks = model.get_submodule(arch.fam.layers_path)
        per_layer = [sum(p.numel() for p in block.parameters()) for block in blocks]
        scored = [sum(named[n].numel() for n in grad_param_names(config, gqa_mode, [layer]))
                  for layer in range(arch.num_layers)]
        return cls(layers=sum(per_layer), largest_layer=max(per_layer), scored=sum(scored),
                   scored_largest_layer=max(scored))


def sharded_breakdown(single: MemoryBreakdown, sizes: ShardSizes, itemsize: int, ranks: int) -> MemoryBreakdown:
    """One rank's peak under ``--shard`` over ``ranks`` GPUs, from the one-GPU peak ``single`` of the same
    micro-batch (fp32 accumulators; weights of ``itemsize`` bytes). A model of FSDP2's allocations, not a
    trace of them:

    * weights: the layers' fp32 master shards (4 bytes / ranks per element) instead of the whole layers,
      plus the rest of the model whole (embeddings, output layer, final norm), plus two layers gathered
      whole in the build's dtype (the one computing and the next one);
    * accumulators: the fp32 gradient shards of the scored weights (4 bytes / ranks), plus one layer's
      reduce-scatter in flight (its gradient in the build's dtype and its fp32 copy);
    * activations, logits and workspace: the one-GPU run's (FSDP shards no activation).
    """
    weights = (single.weights - sizes.layers * itemsize + -(-sizes.layers * 4 // ranks)
               + 2 * sizes.largest_layer * itemsize)
    accumulators = -(-sizes.scored * 4 // ranks) + sizes.scored_largest_layer * (itemsize + 4)
    return MemoryBreakdown(weights=weights, accumulators=accumulators, activations=single.activations,
                           logits=single.logits, workspace=single.workspace)
