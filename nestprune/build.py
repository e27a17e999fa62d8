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


ACCUMULATOR_CHOICES = ("auto", "fp32", "bf16-stochastic", "fp32-host")
DEFAULT_MICRO_BATCH = 8  # ``auto`` where no plan is made (methods without gradients, a model given loaded)
GRADIENT_METHODS = ("gisp", "gisp-oneshot")  # the methods a memory plan is made for


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
    batch_size: int | str = option("auto", cli_type=str,
                                   help="sequences per micro-batch: 'auto' (the largest the device's memory holds, "
                                        "per the memory plan; on a CPU at most 8192 tokens) or a number; a step "
                                        "always covers every calibration sequence")
    seed: int = option(0, help="seed of the calibration sample (and of --method random's draw)")
    max_sparsity: float | None = option(None, gt=0.0, lt=1.0, help="stop once this parameter sparsity is "
                                        "reached (GISP goes past --r-max if needed)")
    gqa_mode: str = option("query", choices=("query", "group"),
                           help="GQA: 'query' prunes query heads (reference), 'group' prunes KV groups")
    skip_first_frac: float = option(0.1, ge=0.0, lt=1.0, help="never prune layers below int(frac*L)")
    skip_last: int = option(1, ge=0, help="never prune this many last layers")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    dtype: str = option("auto", choices=DTYPES, help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    compact: bool = option(True, flag="--no-compact", negate=True,
                           help="only zero removed heads and channels instead of cutting them out of the working "
                                "model (same ranking, slower; for checks and debugging)")
    accumulator: str = option("auto", choices=ACCUMULATOR_CHOICES,
                              help="gradient accumulation of bf16/fp16 weights: auto (fp32 when it fits, else "
                                   "bf16-stochastic, else fp32-host, per the memory plan) | fp32 | bf16-stochastic "
                                   "| fp32-host")
    device_memory: str | None = option(None, help="device memory to plan for, e.g. 80GiB (default: the GPU's; on a "
                                                  "CPU the available host memory)")
    shard: bool = option(False, flag="--shard",
                         help="under torchrun: shard the decoder layers over the ranks (FSDP2) for a model that does "
                              "not fit one device (builds without compaction)")

    def __init__(self, method: str | Any = "gisp", objective: str | Any | None = None, **options: Any):
        shared = {p.key: p for p in params(BuildConfig)}
        # a negated flag's field may be given by its own name too (dataclasses.replace does): compact=False
        for p in list(shared.values()):
            if p.field != p.key and p.field in options:
                value = options.pop(p.field)
                options.setdefault(p.key, None if value is None else p.to_field(value))
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
            object.__setattr__(self, p.field, p.to_field(options[key]) if options.get(key) is not None else p.default)
        object.__setattr__(self, "batch_size", _batch_size(self.batch_size))
        if self.device_memory is not None:
            from nestprune.rank.plan import parse_memory

            parse_memory(self.device_memory)
        check(self)

    def validate(self) -> None:
        """Check every part again (the config classes check themselves when made)."""
        _batch_size(self.batch_size)
        check(self)
        check(self.method)
        check(self.objective)



def _batch_size(value: Any) -> int | str:
    """'auto' or a positive integer (a string of digits from the command line counts)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise NestpruneError(f"--batch-size must be 'auto' or a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_arch(model_dir: Path) -> ArchInfo:
    from nestprune.arch import arch_from_config
    from nestprune.io.weights import SafetensorsSource

    config = read_config(model_dir)
    arch_from_config(config)  # an unsupported family is refused before the weights' headers are read
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


def resolved(cfg: BuildConfig, micro_batch: int | None = None, accumulator: str | None = None) -> tuple[int, str]:
    """(micro-batch, accumulator) a build runs with: what a memory plan chose (:func:`plan_for_build`), else an
    ``auto`` batch size is :data:`DEFAULT_MICRO_BATCH` and an ``auto`` accumulator fp32."""
    if micro_batch is None:
        micro_batch = DEFAULT_MICRO_BATCH if cfg.batch_size == "auto" else int(cfg.batch_size)
    if accumulator is None:
        accumulator = "fp32" if cfg.accumulator == "auto" else cfg.accumulator
    return micro_batch, accumulator


def rank_model(model: torch.nn.Module, arch: ArchInfo, objective: Objective, cfg: BuildConfig,
               reporter: Reporter | None = None, *, micro_batch: int | None = None,
               accumulator: str | None = None, hooks: Any = None, group: Any = None) -> RankResult:
    """Run ``cfg.method`` on a loaded model (GISP zeroes what it removes, in place).

    ``micro_batch`` / ``accumulator``: see :func:`resolved`. ``hooks``: GISP's ``StepHooks`` (a resume's
    checkpoints, ``nestprune.resume.StepCheckpoints``); the other methods ignore them. ``group``: the ranks
    of a distributed build (``distributed.Group``; None: this process alone); under ``--shard`` the model is
    sharded and builds without compaction."""
    from nestprune.arch import Structures

    micro_batch, accumulator = resolved(cfg, micro_batch, accumulator)
    job = RankJob(model=model, structures=Structures(arch, cfg.gqa_mode), objective=objective,
                  batch_size=micro_batch, seed=cfg.seed, max_sparsity=cfg.max_sparsity,
                  skip_first_frac=cfg.skip_first_frac, skip_last=cfg.skip_last,
                  reporter=reporter or SilentReporter(), accumulator=accumulator, hooks=hooks, group=group,
                  compact=cfg.compact and not (group is not None and group.shard))
    return rank(cfg.method, job)


# ---------------------------------------------------------------------------------------------
# The memory plan and the early checks
# ---------------------------------------------------------------------------------------------


def plan_steps(cfg: BuildConfig, num_layers: int) -> tuple[int, float]:
    """(schedule steps, r_max) of the configured method (GISP's default: 3.5 per layer, at least 16)."""
    method = cfg.method
    if method.name == "gisp-oneshot":
        return 1, method.r_max
    steps = getattr(method, "steps", None) or max(16, round(3.5 * num_layers))
    return steps, getattr(method, "r_max", 0.7)


def objective_shape(cfg: BuildConfig, objective: Objective | None = None) -> tuple[int, int]:
    """(sequences per step, tokens per sequence) a plan uses: the objective's own when it says
    (``plan_shape()``; the LM objective) or holds ``lengths`` (margin, answer: the longest), else the
    configured ``--samples`` / ``--seq-len`` / ``--max-tokens``, else the LM defaults (2000 × 256)."""
    from nestprune.objectives.lm import LM_DEFAULT_SAMPLES, LM_DEFAULT_SEQ_LEN

    if objective is not None and hasattr(objective, "plan_shape"):
        return tuple(objective.plan_shape())  # type: ignore[return-value]
    lengths = getattr(objective, "lengths", None)
    if lengths is not None and len(lengths):
        return len(lengths), int(max(lengths))
    oc = cfg.objective
    seq_len = getattr(oc, "seq_len", None) or LM_DEFAULT_SEQ_LEN
    samples = getattr(oc, "samples", None)
    if samples is None:
        max_tokens = getattr(oc, "max_tokens", None)
        samples = max(1, max_tokens // seq_len) if max_tokens else LM_DEFAULT_SAMPLES
    return samples, seq_len


def plan_device(cfg: BuildConfig) -> torch.device:
    """The device a plan is for: ``--device``; with ``auto``, CUDA when present, or when ``--device-memory``
    is given (planning for a GPU on a machine without one), else the CPU."""
    import torch

    from nestprune.device import resolve_device

    if cfg.device == "auto" and not torch.cuda.is_available() and cfg.device_memory is not None:
        return torch.device("cuda")
    return resolve_device(cfg.device)


def plan_for_build(cfg: BuildConfig, config: dict, device: torch.device, dtype: torch.dtype,
                   objective: Objective | None = None, throughput: float | None = None,
                   measure: bool = False, ranks: int = 1, shard: bool = False, local_ranks: int = 1,
                   scaling: bool = False):
    """The memory plan of this build (``nestprune.rank.plan``): from config.json alone, on the meta device;
    per GPU for a build over ``ranks`` GPUs (``shard``: FSDP2), ``local_ranks`` of them sharing this
    machine's memory on a CPU. ``scaling``: with the table of per-GPU peaks for 1, 2, 4, 8, … GPUs."""
    from nestprune.rank.plan import (
        CPU_MICRO_BATCH_TOKENS,
        Estimator,
        available_host_memory,
        detect_device_memory,
        plan_build,
        scaling_table,
    )

    samples, seq_len = objective_shape(cfg, objective)
    steps, r_max = plan_steps(cfg, int(config.get("num_hidden_layers", 1)))
    if cfg.device_memory is not None:
        memory: int | str = cfg.device_memory
    elif device.type == "cuda":
        memory = detect_device_memory(device) or 0
    else:
        memory = max(1, available_host_memory() // max(1, local_ranks))
    estimator = Estimator(config, dtype, seq_len, cfg.gqa_mode)
    kw = dict(samples=samples, seq_len=seq_len, dtype=dtype, steps=steps, r_max=r_max,
              batch_size=cfg.batch_size, accumulator=cfg.accumulator, gqa_mode=cfg.gqa_mode,
              max_sparsity=cfg.max_sparsity, skip_first_frac=cfg.skip_first_frac, skip_last=cfg.skip_last,
              compact=cfg.compact and cfg.method.name == "gisp", ranks=ranks, shard=shard, estimator=estimator,
              max_micro_batch=None if device.type == "cuda" else max(1, CPU_MICRO_BATCH_TOKENS // seq_len))
    if scaling:
        kw["scaling"] = scaling_table(estimator, memory, accumulator=cfg.accumulator,
                                      ranks=tuple(sorted({1, 2, 4, 8, 16, 32, 64, ranks})))
    plan = plan_build(config, memory, throughput=throughput, **kw)
    if measure and throughput is None and plan.fits and device.type == "cuda" and torch_cuda_available():
        from nestprune.rank.plan import measure_device_throughput

        tps = measure_device_throughput(config, dtype, plan.micro_batch, seq_len, cfg.gqa_mode, device)
        plan = plan_build(config, memory, throughput=tps, throughput_source="measured", **kw)
    return plan


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_writable(out: Path) -> None:
    """The nearest existing folder above ``out`` must let us create ``out`` there."""
    import os

    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if parent.is_dir() and os.statvfs(parent).f_flag & os.ST_RDONLY:
        import errno

        raise NestpruneError(f"cannot write --out {out}: {parent}: {os.strerror(errno.EROFS)}")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise NestpruneError(f"cannot write --out {out}: {parent} is not a writable folder")


def read_config(model_dir: Path) -> dict:
    from nestprune.io.fingerprint import config_path

    try:
        return json.loads(config_path(model_dir).read_text())
    except ValueError as e:
        raise NestpruneError(f"{model_dir}/config.json is not valid JSON ({e})") from None


def plan_only(model_dir: Path, cfg: BuildConfig, throughput: float | None = None, ranks: int | None = None):
    """``nestprune build MODEL --plan``: the plan from config.json alone (no weights, no data), per GPU for a
    build over ``ranks`` GPUs (default: torchrun's WORLD_SIZE, else 1; ``cfg.shard``: sharded), with the
    table of per-GPU peaks for other GPU counts."""
    from nestprune.arch import arch_from_config
    from nestprune.device import resolve_dtype
    from nestprune.rank.distributed import launch_env

    cfg.validate()
    where = launch_env()
    if ranks is None:
        ranks = where.world if where is not None else 1
    if ranks < 1:
        raise NestpruneError(f"--nproc must be a positive number of GPUs, not {ranks}")
    config = read_config(Path(model_dir))
    arch_from_config(config)  # a supported family
    if cfg.method.name not in GRADIENT_METHODS:
        raise NestpruneError(f"--method {cfg.method.name} computes no gradients; a memory plan is for gisp and "
                             "gisp-oneshot")
    device = plan_device(cfg)
    return plan_for_build(cfg, config, device, resolve_dtype(cfg.dtype, device), throughput=throughput,
                          measure=True, ranks=ranks, shard=cfg.shard, scaling=True)


def build_artifact(
    model_dir: Path,
    data: Path | None,
    out: Path,
    config: BuildConfig | None = None,
    *,
    objective: Objective | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> Path:
    """Build the ranking artifact of ``model_dir`` and write it to ``out`` (atomically).

    The objective is the one ``config.objective`` describes, on ``data``; an ``objective`` instance
    (any object with name/batches/loss/provenance) overrides it. Everything that can be checked before
    computing is, in this order: ``--out`` free and writable, a checkpoint of an interrupted build to
    ``out`` (``nestprune.resume``: refused without ``resume`` unless ``force``; with ``resume``, its options
    against these), the model's family supported and its tensors present, the data readable and long enough
    (the objective is built), for the gradient methods the memory plan fits the device (else one line: what
    it needs, what would fit), and a checkpoint's base model and calibration batches; only then are the
    weights loaded.

    GISP saves a checkpoint beside ``out`` after every step and removes it once the artifact is written;
    ``resume`` continues from it (with none, the build starts from the beginning and says so).

    Launched by torchrun (``nestprune.rank.distributed``), every rank runs this: the ranks share each step's
    micro-batches, meet once per step, and agree on every removal; rank 0 alone checks and writes ``out`` and
    the checkpoints, and reports progress (the other ranks read a checkpoint they resume from at the same
    path); a failure on any rank ends every rank with its message and status.
    """
    from nestprune.device import resolve_device
    from nestprune.rank import distributed

    cfg = config or BuildConfig()
    cfg.validate()
    where = distributed.launch_env()
    if cfg.shard and cfg.method.name not in GRADIENT_METHODS:
        raise NestpruneError(f"--shard is for the gradient methods ({', '.join(GRADIENT_METHODS)}), not "
                             f"--method {cfg.method.name}")
    if cfg.shard and cfg.accumulator not in ("auto", "fp32"):
        raise NestpruneError("--shard accumulates the gradient shards in fp32 (FSDP); --accumulator "
                             f"{cfg.accumulator} does not apply")
    device = distributed.rank_device(resolve_device(cfg.device), where)
    with distributed.launch(device, where, shard=cfg.shard) as group, group.guard():
        return _build(Path(model_dir), data, Path(out), cfg, device, group, objective=objective, force=force,
                      reporter=reporter if group.main else None, resume=resume)


def _build(model_dir: Path, data: Path | None, out: Path, cfg: BuildConfig, device: torch.device, group: Any, *,
           objective: Objective | None, force: bool, reporter: Reporter | None, resume: bool) -> Path:
    """:func:`build_artifact` on one rank of ``group``."""
    import contextlib

    import torch

    from nestprune import resume as resuming
    from nestprune.artifact import prepare_out, write_artifact
    from nestprune.device import device_name, resolve_dtype
    from nestprune.io.fingerprint import fingerprint
    from nestprune.objectives.base import Objective as ObjectiveProtocol

    folder = resuming.resume_dir(out)
    if group.main:
        prepare_out(out, force, inputs=(model_dir, data))  # before any work: --out may not be an input
        check_writable(out)
        saved, line = resuming.find(out, resume=resume, force=force)
        if saved is not None and objective is None:  # the options first: refused before any data or weights are read
            diffs = resuming.config_differences(saved.doc.inputs, cfg)
            if diffs:
                raise resuming.refuse(saved.folder, diffs)
        if line and hasattr(reporter, "on_note"):
            reporter.on_note(line)
    else:  # the others read the checkpoint rank 0 resumes from (the ranks check that it is the same one)
        saved = resuming.load_checkpoint(folder) if resume else None
    arch = read_arch(model_dir)
    started = time.perf_counter() - (saved.doc.elapsed_seconds if saved is not None else 0.0)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(model_dir)
    objective_config = None
    if objective is None:
        objective, objective_config = make_objective(cfg.objective, data, tokenizer, cfg.seed), cfg.objective
    if not isinstance(objective, ObjectiveProtocol):
        raise NestpruneError(f"objective {objective!r} does not implement batches/loss/provenance")
    micro_batch, accumulator = None, None
    if cfg.method.name in GRADIENT_METHODS:
        # a resumed 'auto' batch size or accumulator continues with what the interrupted run chose: the same sums
        plan_cfg = resuming.continued_config(cfg, saved) if saved is not None else cfg
        plan = plan_for_build(plan_cfg, read_config(model_dir), device, dtype, objective, ranks=group.world,
                              shard=group.shard, local_ranks=group.local_world)
        if not plan.fits:
            tries = (["--batch-size 1"] if plan.micro_batch > 1 else []) + (
                ["--accumulator bf16-stochastic or fp32-host"] if plan.accumulator == "fp32" else
                ["--accumulator fp32-host"] if plan.accumulator != "fp32-host" else [])
            tries += ["a shorter --seq-len", "more ranks" if group.shard else "--shard over several GPUs"]
            raise NestpruneError(f"the build {plan.verdict()}; try {', '.join(tries)} or a larger device")
        if hasattr(reporter, "on_plan"):
            reporter.on_plan(plan)
        micro_batch, accumulator = plan.micro_batch, plan.accumulator
    micro_batch, accumulator = resolved(cfg, micro_batch, accumulator)
    group.agree("the inputs (model config, calibration data, options, the memory plan's micro-batch, the checkpoint "
                "resumed from: readable at the same path by every rank)",
                _inputs_digest(model_dir, cfg, objective, micro_batch, accumulator, saved))
    inputs = None
    if group.main:  # the content fingerprint reads every byte: only for the manifest and the checkpoints
        fp = fingerprint(model_dir)
        inputs = resuming.run_inputs(cfg, base=fp, objective=objective, objective_config=objective_config,
                                     micro_batch=micro_batch, accumulator=accumulator, device=device, dtype=dtype,
                                     run={"ranks": group.world} if group.world > 1 else None)
        if saved is not None:
            diffs = resuming.differences(resuming.input_items(saved.doc.inputs), resuming.input_items(inputs))
            if diffs:
                raise resuming.refuse(saved.folder, diffs)
    group.agree("the checkpoint's inputs")  # rank 0's refusal is every rank's
    windows = getattr(getattr(objective, "calib", None), "windows", None)
    hooks = resuming.StepCheckpoints(folder, out, inputs, saved, started=started, writer=group.main,
                                     tensors={"calibration.windows": windows} if windows is not None else None)
    with resuming.build_lock(out) if group.main else contextlib.nullcontext():
        if saved is None and group.main:
            resuming.discard(folder)  # --force without --resume; or what a kill before the first step left
        torch.manual_seed(cfg.seed)
        if group.shard:
            model = load_sharded(model_dir, arch, dtype, group)
        else:
            model = load_model(model_dir, device, dtype)
        total_params = sum(p.numel() for p in model.parameters())
        result = rank_model(model, arch, objective, cfg, reporter, micro_batch=micro_batch, hooks=hooks, group=group,
                            # --shard: FSDP accumulates the gradient shards, in fp32 (distributed.shard_model)
                            accumulator="grad" if group.shard else accumulator)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if group.main:
            manifest = _manifest(cfg, arch, result, fp, objective, objective_config, total_params,
                                 dtype=str(dtype).removeprefix("torch."), device=device_name(device),
                                 seconds=time.perf_counter() - started, batch_size=micro_batch)
            write_artifact(out, manifest, result.ranking, force=force, inputs=(data,))
            resuming.discard(folder)  # the artifact is complete
        group.agree("the artifact written")  # the other ranks wait: rank 0's failure is theirs too
    return out


def _inputs_digest(model_dir: Path, cfg: BuildConfig, objective: Objective, micro_batch: int, accumulator: str,
                   saved: Any) -> bytes:
    """What every rank must have alike before it loads the model: config.json, the objective (its
    provenance: data file, windows), the options, the plan's choices, the checkpoint it resumes from."""
    import hashlib

    from nestprune.config import record
    from nestprune.io.fingerprint import config_path

    doc = {"config": config_path(model_dir).read_text(), "objective": objective.provenance(),
           "method": record(cfg.method), "options": {p.field: getattr(cfg, p.field) for p in params(BuildConfig)},
           "micro_batch": micro_batch, "accumulator": accumulator,
           "resumed": None if saved is None else saved.doc.model_dump_json()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).digest()


def load_sharded(model_dir: Path, arch: ArchInfo, dtype: torch.dtype, group: Any) -> torch.nn.Module:
    """``--shard``: the model with its decoder layers sharded over the ranks (``distributed.shard_model``).
    The ranks of a node load one after the other (each reads the whole model into host memory before its
    shards go to its device), so a node holds one host copy at a time."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from nestprune.rank.distributed import shard_model

    mesh = init_device_mesh(torch.device(group.device).type, (group.world,))
    model = None
    for _ in group.stagger():
        model = load_model(model_dir, torch.device("cpu"), dtype)
        shard_model(model, arch, group, dtype, mesh)
    assert model is not None
    return model


def _manifest(cfg: BuildConfig, arch: ArchInfo, result: RankResult, fp: Any, objective: Objective,
              objective_config: Any, total_params: int, *, dtype: str, device: str, seconds: float,
              batch_size: int):
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
            batch_size=batch_size, dtype=dtype, seed=cfg.seed,
            method_config=ConfigRecord(**record(cfg.method)),
        ),
        trajectory=result.trajectory,
        ranking=RankingInfo(num_structures=len(ranking), num_removed=ranking.num_removed,
                            max_sparsity=ranking.max_sparsity, fields=list(RANKING_FIELDS),
                            sha256=ranking_sha256(ranking)),
        device=device,
        total_seconds=seconds,
    )

