"""Resume after pre-emption: the checkpoint a GISP build saves after every step, and what a resume checks.

where     ``<parent>/.<name>.nestprune-resume/`` beside ``--out`` (never inside it: the artifact appears whole or
          not at all), removed once the artifact is complete. It holds ``checkpoint.json`` (the
          ``schemas.resume`` document) and ``state-<steps>.safetensors`` (the arrays). No pickles.
what      the full-width picture the GISP loop carries (``GispState``: which structures were removed, at which
          step and score, the latest scores, the removal order, the trajectory; never compacted tensors), the
          random number generators' states, the calibration windows, and :class:`RunInputs`: the base model
          (config and content fingerprint), the exact batches a step feeds (data, tokenizer, window options),
          every option of the typed configs (method, objective, the shared build options: derived from their
          declarations, so a new option is covered without listing it here), what the run resolved (device
          type, dtype, micro-batch, accumulator) and the versions.
how       after each completed step: the arrays to a new ``state-<steps>.safetensors``, then ``checkpoint.json``
          pointing at it (and holding its sha256), each written to a temporary, fsynced and renamed
          (``atomic.write_file(durable=True)``); then the previous arrays file is deleted. The JSON's rename is
          the commit: a kill at any moment leaves the last complete checkpoint, and what a kill leaves half
          written is a temporary the next run sweeps.
resume    re-reads the base weights and replays the removals step by step (``Workspace.replay``: compaction
          cuts the same blocks to the same widths), restores the generators and continues with the next step,
          so the artifact's ranking is the uninterrupted build's, byte for byte. Inputs that differ are
          refused in one line naming each difference.
separable :func:`load_checkpoint` and :func:`save_checkpoint` are plain functions of a folder;
          :class:`StepCheckpoints` (GISP's ``StepHooks``) takes ``writer=False`` for a process that only reads
          (the ranks other than 0 of a distributed build), and ``RunInputs.run`` takes what such a build adds
          (e.g. its world size).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from nestprune import __version__
from nestprune.config import params, record
from nestprune.errors import NestpruneError, validation_message
from nestprune.io import atomic
from nestprune.schemas.artifact import ConfigRecord
from nestprune.schemas.resume import (
    RESUME_KIND,
    RESUME_SCHEMA_VERSIONS,
    ResumeCheckpoint,
    RngStates,
    RunInputs,
)

if TYPE_CHECKING:
    import torch

    from nestprune.objectives.base import Objective
    from nestprune.rank.gisp import GispPlan, GispState, Workspace
    from nestprune.schemas.artifact import BaseFingerprint

CHECKPOINT_JSON = "checkpoint.json"
STATE_PREFIX, STATE_SUFFIX = "state-", ".safetensors"
# shared build options that only say where and how to run: their effect on the result is what the run
# resolved, recorded in ``RunInputs.run`` under these names (every other option is compared as given)
RESOLVED_OPTIONS = {"device": "device", "dtype": "dtype", "batch_size": "micro_batch", "device_memory": "micro_batch",
                    "accumulator": "accumulator"}
RUN_LABELS = {"device": "the device type (--device)", "dtype": "the dtype (--dtype)",
              "micro_batch": "the micro-batch (--batch-size)", "accumulator": "the accumulator (--accumulator)",
              "ranks": "the number of ranks (torchrun)"}
STATE_ARRAYS = ("pruned", "step", "score", "raw", "last_score", "last_raw")


def resume_dir(out: Path) -> Path:
    """The checkpoint folder of a build to ``out``: hidden, beside it."""
    out = Path(out)
    return out.parent / f".{atomic.stem(out.name)}.nestprune-resume"


# ---------------------------------------------------------------------------------------------
# What the result depends on
# ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def shared_options(cfg: Any) -> dict[str, Any]:
    """The build options every method shares, by flag, as the flag says them (``--no-compact``: True when
    compaction is off); those in :data:`RESOLVED_OPTIONS` are left to ``run``."""
    return {p.flag: _jsonable(p.to_field(getattr(cfg, p.field))) for p in params(type(cfg))
            if p.field not in RESOLVED_OPTIONS}


def config_record(cfg: Any) -> ConfigRecord:
    """A method's or objective's config as its record reads back from JSON (tuples as lists)."""
    return ConfigRecord.model_validate(_jsonable(record(cfg)))


def batches_sha256(objective: Objective) -> str:
    """sha256 over what one step feeds the model, sequence by sequence (batches of one: the same whatever the
    micro-batch, which ``run`` records), in order: each tensor's name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    for i, batch in enumerate(objective.batches(1)):
        h.update(f"batch {i}\n".encode())
        for name in sorted(batch):
            t = torch.as_tensor(batch[name]).detach().cpu().contiguous()
            h.update(f"{name}\t{t.dtype}\t{list(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_inputs(cfg: Any, *, base: BaseFingerprint, objective: Objective, objective_config: Any, micro_batch: int,
               accumulator: str, device: torch.device, dtype: torch.dtype,
               run: dict[str, Any] | None = None) -> RunInputs:
    """The :class:`RunInputs` of a build (``cfg``: its ``BuildConfig``); ``run``: more resolved settings to
    record and compare (a distributed build's world size)."""
    import torch

    if base.content is None:
        raise NestpruneError("internal: a build's base fingerprint lacks its content fingerprint")
    resolved = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "micro_batch": int(micro_batch),
                "accumulator": accumulator, **(run or {})}
    inputs = RunInputs(
        base_config_sha256=base.config_sha256, base_content_sha256=base.content.sha256, objective=objective.name,
        objective_config=config_record(objective_config) if objective_config is not None else None,
        batches_sha256=batches_sha256(objective), method=config_record(cfg.method),
        options=shared_options(cfg), run=_jsonable(resolved),
        versions={"nestprune": __version__, "torch": torch.__version__.split("+")[0]},
    )
    return RunInputs.model_validate_json(inputs.model_dump_json())  # as it reads back from the JSON


@dataclass(frozen=True)
class _Item:
    label: str  # what a message names: a flag, or what it is in words
    value: Any
    show: bool = True  # False: a digest, said to have changed rather than shown


def _config_items(section: str, flag: str, registry: Any, rec: ConfigRecord | None) -> dict[str, _Item]:
    if rec is None:
        return {}
    items = {f"{section}": _Item(flag, rec.name), f"{section}.version": _Item(f"the {rec.name} config version",
                                                                              rec.version)}
    try:
        declared = {p.field: p for p in params(registry.config_class(rec.name))}
    except NestpruneError:  # a name this nestprune does not register: its options are named by field
        declared = {}
    for field, value in rec.options.items():
        p = declared.get(field)
        items[f"{section}.{rec.name}.{field}"] = _Item(p.flag if p else f"{rec.name} option {field}",
                                                       p.to_field(value) if p else value)
    return items


def config_items(method: ConfigRecord, objective: str, objective_config: ConfigRecord | None,
                 options: dict[str, Any]) -> dict[str, _Item]:
    """What the typed configs say, item by item (an option of a method or objective not chosen is absent)."""
    from nestprune.objectives import OBJECTIVES
    from nestprune.rank.methods import RANKERS

    items = _config_items("method", "--method", RANKERS, method)
    items.update(_config_items("objective", "--objective", OBJECTIVES, objective_config))
    items.setdefault("objective", _Item("--objective", objective))
    items.update({f"option.{flag}": _Item(flag, value) for flag, value in options.items()})
    return items


def input_items(inputs: RunInputs) -> dict[str, _Item]:
    items = {"base.config": _Item("the base model's config.json", inputs.base_config_sha256, False),
             "base.content": _Item("the base model's weights (content fingerprint)", inputs.base_content_sha256,
                                   False)}
    items.update(config_items(inputs.method, inputs.objective, inputs.objective_config, inputs.options))
    items["batches"] = _Item("the calibration batches (data, tokenizer or window options)", inputs.batches_sha256,
                             False)
    items.update({f"run.{k}": _Item(RUN_LABELS.get(k, k), v) for k, v in inputs.run.items()})
    items.update({f"version.{k}": _Item(f"the {k} version", v) for k, v in inputs.versions.items()})
    return items


def differences(saved: dict[str, _Item], now: dict[str, _Item]) -> list[str]:
    """Each item that differs, in words: ``--r-max (0.7 in the checkpoint, 0.5 now)``; a method or objective
    that differs is named alone, not each of its options."""
    whole = {k for k in saved.keys() & now.keys() if "." not in k and saved[k].value != now[k].value}
    out = []
    for key in [*saved, *(k for k in now if k not in saved)]:
        a, b = saved.get(key), now.get(key)
        if (a is not None and b is not None and a.value == b.value) or ("." in key and key.split(".")[0] in whole):
            continue
        item = a or b
        if not item.show:
            out.append(f"{item.label} changed")
        else:
            was, new = (json.dumps(x.value) if x is not None else "absent" for x in (a, b))
            out.append(f"{item.label} ({was} in the checkpoint, {new} now)")
    return out


def config_differences(saved: RunInputs, cfg: Any) -> list[str]:
    """:func:`differences` of the typed configs alone (``cfg``: a ``BuildConfig``): checked before any data or
    weights are read."""
    now = config_items(config_record(cfg.method), cfg.objective.name, config_record(cfg.objective),
                       shared_options(cfg))
    return differences(config_items(saved.method, saved.objective, saved.objective_config, saved.options), now)


def continued_config(cfg: Any, saved: Saved) -> Any:
    """``cfg`` with an ``auto`` batch size or accumulator set to what the checkpoint's run resolved (a resumed
    build sums its gradients in the same micro-batches, so its result is the uninterrupted build's)."""
    import dataclasses

    run = saved.doc.inputs.run
    changes: dict[str, Any] = {}
    if cfg.batch_size == "auto" and isinstance(run.get("micro_batch"), int):
        changes["batch_size"] = run["micro_batch"]
    if cfg.accumulator == "auto" and isinstance(run.get("accumulator"), str):
        changes["accumulator"] = run["accumulator"]
    return dataclasses.replace(cfg, **changes) if changes else cfg


def refuse(folder: Path, diffs: list[str]) -> NestpruneError:
    return NestpruneError(f"cannot resume from the checkpoint in {folder}: it was made with other inputs: "
                          f"{'; '.join(diffs)}. Rerun with the same inputs, or without --resume and with --force "
                          "to start over")


# ---------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None) -> tuple[RngStates, dict[str, torch.Tensor]]:
    """The states of Python's, NumPy's and torch's generators (CPU, and CUDA where it was used), and of the
    stochastic-rounding ``generator``."""
    import torch

    tensors = {"rng.torch": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(cuda)})
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
    np_state = np.random.get_state(legacy=False)
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.uint32).view(np.int32).copy())
    doc = RngStates(python=_jsonable(random.getstate()), numpy_pos=int(np_state["state"]["pos"]),
                    numpy_has_gauss=int(np_state["has_gauss"]), numpy_gauss=float(np_state["gauss"]),
                    cuda_devices=len(cuda), generator=generator is not None)
    return doc, tensors


def restore_rng(doc: RngStates, tensors: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    import torch

    version, state, gauss = doc.python
    random.setstate((version, tuple(state), gauss))
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": tensors["rng.numpy"].numpy().view(np.uint32), "pos": doc.numpy_pos},
                         "has_gauss": doc.numpy_has_gauss, "gauss": doc.numpy_gauss})
    torch.set_rng_state(tensors["rng.torch"])
    if doc.cuda_devices and torch.cuda.is_available() and torch.cuda.device_count() == doc.cuda_devices:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(doc.cuda_devices)])
    if generator is not None and doc.generator:
        generator.set_state(tensors["rng.generator"])


# ---------------------------------------------------------------------------------------------
# The checkpoint on disk
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saved:
    """A checkpoint read back: its document and its arrays."""

    folder: Path
    doc: ResumeCheckpoint
    tensors: dict[str, torch.Tensor]

    def state(self) -> GispState:
        """The loop's state after the saved step (fresh arrays: the run changes them in place)."""
        from nestprune.rank.gisp import GispState

        arr = {name: self.tensors[f"state.{name}"].numpy().copy() for name in STATE_ARRAYS}
        order = self.tensors["state.order"].numpy()
        cuts = np.cumsum([0, *self.doc.order_lengths])
        return GispState(pruned=arr["pruned"], step=arr["step"], score=arr["score"], raw=arr["raw"],
                         order=[order[a:b].copy() for a, b in zip(cuts[:-1], cuts[1:], strict=True)],
                         last_score=arr["last_score"], last_raw=arr["last_raw"],
                         trajectory=list(self.doc.trajectory), t=self.doc.steps_done)

    def progress(self) -> str:
        return f"{self.doc.steps_done} of {self.doc.steps_planned} step(s) done"


def damaged(folder: Path, why: str) -> NestpruneError:
    return NestpruneError(f"the checkpoint in {folder} is damaged ({why}); remove that folder, or rerun without "
                          "--resume and with --force to start over")


def read_doc(folder: Path) -> ResumeCheckpoint | None:
    """The checkpoint document in ``folder``; None if there is none (one line if it is unreadable)."""
    path = Path(folder) / CHECKPOINT_JSON
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(folder, f"{CHECKPOINT_JSON} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != RESUME_KIND:
        raise damaged(folder, f"{CHECKPOINT_JSON} is not a nestprune checkpoint")
    if data.get("schema_version") not in RESUME_SCHEMA_VERSIONS:
        raise NestpruneError(f"the checkpoint in {folder} has schema version {data.get('schema_version')!r}, which "
                             "this nestprune cannot read; resume with the nestprune that made it, or rerun "
                             "without --resume and with --force to start over")
    try:
        return ResumeCheckpoint.model_validate(data)
    except ValidationError as e:
        raise damaged(folder, f"{CHECKPOINT_JSON} is invalid {validation_message(e)}") from None


def load_checkpoint(folder: Path) -> Saved | None:
    """The checkpoint in ``folder`` with its arrays, every part checked; None if there is none."""
    from safetensors.torch import load

    folder = Path(folder)
    atomic.sweep_dir(folder)  # the temporaries a kill left
    doc = read_doc(folder)
    if doc is None:
        return None
    try:
        data = (folder / doc.tensors).read_bytes()
    except OSError as e:
        raise damaged(folder, f"{doc.tensors}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != doc.tensors_sha256:
        raise damaged(folder, f"{doc.tensors} does not match its sha256")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors' own errors
        raise damaged(folder, f"{doc.tensors}: {e}") from None
    n = doc.structures
    need = [f"state.{a}" for a in STATE_ARRAYS] + ["state.order", "rng.torch", "rng.numpy"]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise damaged(folder, f"{doc.tensors} lacks {missing[0]}")
    if any(tensors[f"state.{a}"].shape != (n,) for a in STATE_ARRAYS):
        raise damaged(folder, f"its arrays are not of {n} structures")
    order = tensors["state.order"].numpy()
    pruned = np.zeros(n, bool)
    pruned[order[(order >= 0) & (order < n)]] = True
    if (len(doc.order_lengths) != doc.steps_done or len(doc.trajectory) != doc.steps_done
            or sum(doc.order_lengths) != len(order) or len(np.unique(order)) != len(order)
            or not np.array_equal(pruned, tensors["state.pruned"].numpy()) or int(pruned.sum()) != len(order)):
        raise damaged(folder, "its removal order does not match its steps and removed structures")
    return Saved(folder, doc, tensors)


def save_checkpoint(folder: Path, *, out: Path, inputs: RunInputs, state: GispState, steps_planned: int,
                    rng: RngStates, tensors: dict[str, torch.Tensor], elapsed: float) -> None:
    """Save ``state`` (after its step ``state.t - 1``) with ``inputs``, ``rng`` and more ``tensors`` (the
    generators', the calibration windows) in ``folder``, durably; the previous checkpoint's arrays go last."""
    import torch
    from safetensors.torch import save

    folder = Path(folder)
    arrays = {f"state.{a}": torch.from_numpy(np.ascontiguousarray(getattr(state, a))) for a in STATE_ARRAYS}
    order = np.concatenate(state.order).astype(np.int64) if state.order else np.zeros(0, np.int64)
    arrays["state.order"] = torch.from_numpy(order)
    arrays.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    data = save(arrays)
    name = f"{STATE_PREFIX}{state.t:06d}{STATE_SUFFIX}"
    fresh = not (folder / name).exists()
    atomic.write_file(folder / name, data, durable=True)
    doc = ResumeCheckpoint(
        nestprune_version=__version__, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        out=str(out), inputs=inputs, steps_done=state.t, steps_planned=steps_planned, structures=len(state.pruned),
        order_lengths=[len(o) for o in state.order], trajectory=list(state.trajectory), elapsed_seconds=elapsed,
        rng=rng, tensors=name, tensors_sha256=hashlib.sha256(data).hexdigest(),
    )
    try:
        atomic.write_file(folder / CHECKPOINT_JSON, (doc.model_dump_json(indent=1) + "\n").encode(), durable=True)
    except BaseException:  # not committed (an interrupt, a full disk): the new arrays go, the previous stay
        if fresh:
            atomic.remove(folder / name)
        raise
    for old in folder.glob(f"{STATE_PREFIX}*{STATE_SUFFIX}"):
        if old.name != name:
            atomic.remove(old)


def discard(folder: Path) -> None:
    """Remove a checkpoint folder (the artifact is complete, or the build starts over)."""
    atomic.remove(Path(folder))


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold the lock of ``out``'s checkpoint for a whole build: a second build to the same ``--out`` fails at
    once with one line instead of writing the same checkpoint."""
    folder = resume_dir(out)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(atomic.lock(folder))
        except NestpruneError:
            raise NestpruneError(f"{out} is being built by another nestprune process; wait for it to finish or "
                                 "choose another --out") from None
        yield


# ---------------------------------------------------------------------------------------------
# At the start of a build, and after each step
# ---------------------------------------------------------------------------------------------


def find(out: Path, *, resume: bool, force: bool) -> tuple[Saved | None, str | None]:
    """The checkpoint a build to ``out`` continues from, and a line to tell the user (or None).

    Without ``resume`` a checkpoint found is refused (one line: pass --resume to continue, or --force to start
    over); with ``force`` it is to be discarded (:func:`discard`, once the build's checks have passed). With
    ``resume`` and none found the build starts from the beginning, and says so."""
    folder = resume_dir(out)
    if not resume:
        if not (folder / CHECKPOINT_JSON).exists():
            return None, None
        try:
            doc = read_doc(folder)
            what = f"the checkpoint of an interrupted build ({doc.steps_done} of {doc.steps_planned} step(s) done)" \
                if doc is not None else "a checkpoint"
        except NestpruneError:  # unreadable: still refused without --force (it may be worth a look)
            what = "a damaged checkpoint"
        if not force:
            raise NestpruneError(f"{out} has {what} in {folder}; pass --resume to continue it, or --force to start "
                                 "over")
        return None, f"starting over: the build discards {what} in {folder} (--force without --resume)"
    saved = load_checkpoint(folder)
    if saved is None:
        return None, f"--resume: no checkpoint of {out} in {folder}; starting from the beginning"
    return saved, f"resuming from the checkpoint in {folder}: {saved.progress()}"


def interrupted_note(out: Path) -> str | None:
    """What to say when a build to ``out`` stops early: the checkpoint kept, if there is one."""
    folder = resume_dir(out)
    try:
        doc = read_doc(folder)
    except NestpruneError:
        return None
    if doc is None:
        return None
    return f"the checkpoint after {doc.steps_done} of {doc.steps_planned} step(s) is kept in {folder}"


class StepCheckpoints:
    """GISP's ``StepHooks`` for a build: continue from ``saved`` (restoring the generators), and after every
    completed step save a checkpoint in ``folder`` (only a ``writer``: rank 0 of a distributed build).

    ``tensors``: more arrays every checkpoint holds (the calibration windows); ``started``: the
    ``time.perf_counter()`` the build's clock counts from (earlier runs' time included)."""

    def __init__(self, folder: Path, out: Path, inputs: RunInputs, saved: Saved | None = None, *,
                 writer: bool = True, tensors: dict[str, torch.Tensor] | None = None, started: float | None = None):
        self.folder, self.out, self.inputs, self.saved, self.writer = Path(folder), Path(out), inputs, saved, writer
        self.tensors = dict(tensors or {})
        self.started = time.perf_counter() if started is None else started

    def restore(self, plan: GispPlan, work: Workspace) -> GispState | None:
        if self.saved is None:
            return None
        doc = self.saved.doc
        if doc.structures != len(plan.table) or doc.steps_planned != plan.steps_planned:
            raise NestpruneError(f"cannot resume from the checkpoint in {self.folder}: it is of {doc.structures} "
                                 f"structures and {doc.steps_planned} steps, this build of {len(plan.table)} and "
                                 f"{plan.steps_planned}")
        restore_rng(doc.rng, self.saved.tensors, work.generator)
        return self.saved.state()

    def step_done(self, plan: GispPlan, state: GispState, work: Workspace) -> None:
        if not self.writer:
            return
        rng, rng_tensors = capture_rng(work.generator)
        save_checkpoint(self.folder, out=self.out, inputs=self.inputs, state=state, steps_planned=plan.steps_planned,
                        rng=rng, tensors={**self.tensors, **rng_tensors},
                        elapsed=time.perf_counter() - self.started)
