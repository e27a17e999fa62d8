"""The resume checkpoint of a build: ``checkpoint.json`` in the hidden folder beside ``--out``.

A GISP build saves one after every completed step (``nestprune.resume``): what the loop carries from step to
step, in full-width terms (which structures were removed, at which step and score; the latest scores), the
random number generators' states, and what the result depends on (:class:`RunInputs`), which a resume must
find unchanged. The arrays are in a safetensors file next to it (``tensors``, checked by ``tensors_sha256``);
this document holds everything else. Compacted tensors are never saved: a resume re-reads the base weights
and replays the removals step by step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nestprune.schemas.artifact import ConfigRecord, StepRecord

RESUME_SCHEMA_VERSIONS = ("1",)
RESUME_KIND = "nestprune.resume"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunInputs(_Doc):
    """Everything the build's result depends on. A resume is refused, naming the items, if any differs."""

    base_config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the base's config.json")
    base_content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$",
                                      description="the base's content fingerprint (every byte of every tensor)")
    objective: str = Field(description="the objective's name")
    objective_config: ConfigRecord | None = Field(description="its config (absent for an objective object given "
                                                  "to the library)")
    batches_sha256: str = Field(pattern=r"^[0-9a-f]{64}$",
                                description="over every sequence a step feeds the model (the calibration "
                                            "windows: token ids, masks, weights), in order, in batches of one")
    method: ConfigRecord
    options: dict[str, Any] = Field(description="the build options every method shares, by flag (those that only "
                                                "say where and how to run are in ``run``, resolved)")
    run: dict[str, Any] = Field(description="what the run resolved: device type, dtype, micro-batch, accumulator "
                                            "(a distributed build adds its own)")
    versions: dict[str, str] = Field(description="nestprune and torch versions")


class RngStates(_Doc):
    """The random number generators' states after the step (the arrays are in the tensors file)."""

    python: list[Any] = Field(description="random.getstate()")
    numpy_pos: int = Field(description="np.random's MT19937 position (its key: tensor rng.numpy)")
    numpy_has_gauss: int
    numpy_gauss: float
    cuda_devices: int = Field(ge=0, description="CUDA generators saved (tensors rng.cuda.N); 0 if CUDA was not used")
    generator: bool = Field(description="the stochastic-rounding generator's state is saved (tensor rng.generator)")


class ResumeCheckpointV1(_Doc):
    schema_version: Literal["1"] = "1"
    kind: Literal["nestprune.resume"] = RESUME_KIND
    nestprune_version: str
    created: str = Field(description="ISO 8601 UTC")
    out: str = Field(description="the --out this checkpoint is for (informational)")
    inputs: RunInputs
    steps_done: int = Field(ge=1, description="steps completed: the next step's index")
    steps_planned: int = Field(ge=1)
    structures: int = Field(ge=1, description="structures in the structure table (length of every array)")
    order_lengths: list[int] = Field(description="structures each step removed (tensor order, concatenated)")
    trajectory: list[StepRecord]
    elapsed_seconds: float = Field(ge=0, description="build time so far, over every run of it")
    rng: RngStates
    tensors: str = Field(description="the safetensors file of the arrays, in this folder")
    tensors_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


ResumeCheckpoint = ResumeCheckpointV1

DOCUMENTS = {"resume": ResumeCheckpointV1}
