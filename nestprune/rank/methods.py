"""The build methods: each one's options (a versioned config class), what every method is given and
returns, and the one registry that binds each config class to its ranking function.

==================  ==============================  =========================================
method              config                          ranking function
==================  ==============================  =========================================
``gisp``            :class:`GispConfig`             ``nestprune.rank.gisp.rank_gisp``
``gisp-oneshot``    :class:`GispOneShotConfig`      ``nestprune.rank.gisp.rank_gisp_oneshot``
``wanda-sp``        :class:`WandaSpConfig`          ``nestprune.rank.wanda.rank_wanda_sp``
``magnitude``       :class:`MagnitudeConfig`        ``nestprune.rank.baselines.rank_magnitude``
``random``          :class:`RandomConfig`           ``nestprune.rank.baselines.rank_random``
==================  ==============================  =========================================

A ranking function is ``fn(config, job: RankJob) -> RankResult``. Adding a method is one config class
here (or in your own module), its function, one entry in :data:`RANKERS` (or
``register_ranker(MyConfig)(fn)``) and its tests; ``nestprune build --method NAME`` and the flat
command-line options of the new class follow. The functions are named by ``"module:function"`` so that
reading the options (the command line does, at start-up) imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nestprune.config import Registry, config, option
from nestprune.errors import NestpruneError

if TYPE_CHECKING:
    import torch

    from nestprune.arch import ArchInfo, Structures
    from nestprune.objectives.base import Objective
    from nestprune.ranking import Ranking
    from nestprune.schemas.artifact import StepRecord

NORMALISATIONS = ("reference", "none")


def _r_max(help: str) -> Any:
    return option(0.7, help=help, gt=0.0, le=1.0)


def _normalisation() -> Any:
    return option("reference", choices=NORMALISATIONS,
                  help="'reference': head score / (4·d_h·d), channel score / (3·I); 'none': raw scores")


@config("gisp", version=1)
class GispConfig:
    """Iterative GISP: T steps of r_t = linspace(0, r_max, T), gradients recomputed on the masked model."""

    r_max: float = _r_max("final structure ratio of the schedule")
    steps: int | None = option(None, ge=1, help="schedule steps T (default: 3.5 per layer, at least 16)")
    normalisation: str = _normalisation()


@config("gisp-oneshot", version=1)
class GispOneShotConfig:
    """GISP in one step: dense-model scores, one global threshold at r_max (1.0 with --max-sparsity,
    then cut at that sparsity)."""

    r_max: float = _r_max("structure ratio of the single step (ignored with --max-sparsity)")
    normalisation: str = _normalisation()


@config("wanda-sp", version=1)
class WandaSpConfig:
    """Wanda-sp (FLAP's structured Wanda): |W|·‖X‖ per structure, the same share removed in every layer."""

    convention: str = option("flap", choices=("flap", "full"),
                             help="'flap': output projections only (the reference); 'full': every owned weight")
    steps: int | None = option(None, ge=1, help="ratio steps T of the sweep (default: max(attention units, "
                                                "channels) per layer)")


@config("magnitude", version=1)
class MagnitudeConfig:
    """‖W_s‖₂ of the weights each structure owns, one global ascending order."""

    normalisation: str = _normalisation()


@config("random", version=1)
class RandomConfig:
    """A seeded uniform draw per structure (the build's --seed), one global ascending order."""


RankerConfig = GispConfig | GispOneShotConfig | WandaSpConfig | MagnitudeConfig | RandomConfig


class Reporter(Protocol):
    """Progress of a build: batches of a calibration pass, then each finished step."""

    def on_batch(self, step: int, done: int, total: int) -> None: ...

    def on_step(self, record: StepRecord, steps_planned: int) -> None: ...


class SilentReporter:
    def on_batch(self, step: int, done: int, total: int) -> None:
        pass

    def on_step(self, record: StepRecord, steps_planned: int) -> None:
        pass


@dataclass(frozen=True)
class RankJob:
    """What every ranking function is given: the model (on its device, modified only by GISP, which
    zeroes what it removes), the structures to rank, the objective, and the settings all methods share."""

    model: torch.nn.Module
    structures: Structures
    objective: Objective
    batch_size: int
    seed: int
    max_sparsity: float | None
    skip_first_frac: float
    skip_last: int
    reporter: Reporter = SilentReporter()
    # how gradient methods run (none changes the ranking beyond fp rounding): cut removed structures out of
    # the working model (``rank/compact.py``; the policy defaults by device), how non-fp32 gradients
    # accumulate (``rank/memory.py``'s ACCUMULATORS)
    compact: bool = True
    compact_policy: Any = None
    accumulator: str = "fp32"
    # GISP's seams for resume (``rank/gisp.py``'s StepHooks; ``rank/checkpoint.py``): where to start from, and
    # a call after every completed step (a checkpoint); None: start afresh, save nothing
    hooks: Any = None
    group: Any = None  # the ranks of a build over several processes (``distributed.Group``); None: one process

    def prunable_layers(self) -> list[int]:
        return prunable_layers(self.structures.arch, self.skip_first_frac, self.skip_last)


def prunable_layers(arch: ArchInfo, skip_first_frac: float, skip_last: int) -> list[int]:
    """The layers a method may prune (GISP's layer skip); none at all is an error."""
    layers = arch.prunable_layers(skip_first_frac, skip_last)
    if not layers:
        raise NestpruneError(f"a {arch.num_layers}-layer model has no prunable layer with this layer skip")
    return layers


@dataclass(frozen=True)
class RankResult:
    """A method's ranking and what the manifest's schedule records about how it was made."""

    ranking: Ranking
    trajectory: list[StepRecord]
    steps_planned: int
    iterative: bool = False
    r_max: float = 1.0  # the structure ratio the schedule goes to
    ratio_step: float = 0.0
    normalisation: str = "none"


Ranker = Callable[[Any, RankJob], RankResult]

RANKERS: Registry[Ranker] = Registry("method", "--method", {
    GispConfig: "nestprune.rank.gisp:rank_gisp",
    GispOneShotConfig: "nestprune.rank.gisp:rank_gisp_oneshot",
    WandaSpConfig: "nestprune.rank.wanda:rank_wanda_sp",
    MagnitudeConfig: "nestprune.rank.baselines:rank_magnitude",
    RandomConfig: "nestprune.rank.baselines:rank_random",
})
register_ranker = RANKERS.register


def rank(cfg: Any, job: RankJob) -> RankResult:
    """Run the method ``cfg`` configures on ``job``."""
    return RANKERS.function(cfg)(cfg, job)
