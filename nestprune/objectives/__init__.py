"""Objectives: what the gradient in GISP's score is the gradient of — one versioned config class per
kind, bound to the function that builds it by one registry.

==========  ====================  ======================================  ====================
kind        config                builds                                  data
==========  ====================  ======================================  ====================
``lm``      :class:`LmConfig`     ``lm.LanguageModeling`` (the default)   text: .txt/.xz/.jsonl
``margin``  :class:`MarginConfig` ``margin.MarginObjective``              multiple-choice JSONL
``answer``  :class:`AnswerConfig` ``answer.AnswerObjective``              prompt/response JSONL
``custom``  :class:`CustomConfig` ``custom.CustomObjective`` (plug-in)    the plug-in's
==========  ====================  ======================================  ====================

Every objective satisfies :class:`nestprune.objectives.base.Objective`: ``loss(model, batch)`` summed
over ``batches(batch_size)`` is the whole objective, so ``build`` only calls ``.backward()``. The items,
prompt joining and encoding margin/answer share with ``nestprune.evaluate`` are in ``items.py``.

A builder is ``fn(config, data_path, tokenizer, seed) -> Objective``; :func:`make_objective` runs the one
bound to a config. Adding a kind is one config class, its builder, one entry in :data:`OBJECTIVES` (or
``register_objective(MyConfig)(fn)``) and its tests; ``nestprune build --objective NAME`` and its options
follow. This module imports no torch (the command line reads the options at start-up).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestprune.config import Registry, config, option
from nestprune.errors import NestpruneError

if TYPE_CHECKING:
    from nestprune.objectives.base import Objective


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` from the command line → dict; values parsed as JSON when they are JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise NestpruneError(f"objective option {pair!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _samples() -> Any:
    return option(None, ge=1, help="lm: calibration windows (default 2000, the reference's, or --max-tokens / "
                                   "--seq-len); margin, answer: a seeded cap on the items (default all)")


def _seq_len() -> Any:
    return option(None, ge=2, help="lm: tokens per window (default 256); margin, answer: length limit "
                                   "(default: the --percentile of the data's lengths)")


def _max_tokens() -> Any:
    return option(None, ge=1, help="token budget (whole items; the reference used 512k); lm: windows = "
                                   "budget / --seq-len when --samples is not given")


def _percentile() -> Any:
    return option(99.0, gt=0.0, le=100.0, help="length limit = this percentile of the items' token lengths")


def _batch_tokens() -> Any:
    return option(None, ge=1, help="at most this many padded tokens per batch (a longer sequence gets its own)")


def _chat_template() -> Any:
    return option(True, flag="--no-chat-template", negate=True,
                  help="do not apply the tokenizer's chat template to prompt and response")


@config("lm", version=1)
class LmConfig:
    """Causal-LM cross-entropy on seeded random windows of calibration text."""

    samples: int | None = _samples()
    seq_len: int | None = _seq_len()
    max_tokens: int | None = _max_tokens()


@config("margin", version=1)
class MarginConfig:
    """Mean CE of the correct choices − mean CE of the incorrect ones (multiple-choice items)."""

    samples: int | None = _samples()
    seq_len: int | None = _seq_len()
    max_tokens: int | None = _max_tokens()
    prompt_template: str = option("{prompt}", help="template of the prompt, e.g. 'Question: {prompt}\\nAnswer:'")
    separator: str = option(" ", help="between prompt and choice/response (none after whitespace)")
    percentile: float = _percentile()
    batch_tokens: int | None = _batch_tokens()


@config("answer", version=1)
class AnswerConfig:
    """Mean CE over the response tokens of prompt/response pairs."""

    samples: int | None = _samples()
    seq_len: int | None = _seq_len()
    max_tokens: int | None = _max_tokens()
    chat_template: bool = _chat_template()
    separator: str = option("", help="between prompt and choice/response (none after whitespace)")
    append_eos: bool = option(False, help="end each response with EOS (without a chat template)")
    percentile: float = _percentile()
    batch_tokens: int | None = _batch_tokens()


@config("custom", version=1)
class CustomConfig:
    """A user objective: ``fn(tokenizer, data_path, options)`` returns an Objective."""

    fn: str | None = option(None, flag="--objective-fn",
                            help="custom objective: 'pkg.module:callable' or 'file.py:callable'")
    options: Mapping[str, Any] = option(default_factory=dict, flag="--objective-arg", cli_type=list[str],
                                        parse=parse_options, help="KEY=VALUE option for the custom objective "
                                                                  "(repeatable)")
    samples: int | None = _samples()
    seq_len: int | None = _seq_len()
    max_tokens: int | None = _max_tokens()
    chat_template: bool = _chat_template()

    def validate(self) -> None:
        if not self.fn:
            raise NestpruneError("objective 'custom' needs a callable: --objective-fn package.module:function")


ObjectiveConfig = LmConfig | MarginConfig | AnswerConfig | CustomConfig
Builder = Callable[[Any, "Path | None", Any, int], "Objective"]

OBJECTIVES: Registry[Builder] = Registry("objective", "--objective", {
    LmConfig: "nestprune.objectives.lm:make_lm",
    MarginConfig: "nestprune.objectives.margin:make_margin",
    AnswerConfig: "nestprune.objectives.answer:make_answer",
    CustomConfig: "nestprune.objectives.custom:make_custom",
}, unknown="unknown objective {name!r}; choose one of {names}")
register_objective = OBJECTIVES.register


def make_objective(cfg: Any, data_path: str | Path | None, tokenizer, seed: int = 0) -> Objective:
    """The objective ``cfg`` describes, on ``data_path``, with ``tokenizer``; ``seed`` seeds its sampling."""
    return OBJECTIVES.function(cfg)(cfg, Path(data_path) if data_path is not None else None, tokenizer, seed)
