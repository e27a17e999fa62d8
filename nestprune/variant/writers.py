"""Output formats: a variant is kept widths (``nestprune.variant.widths``) × a writer (this registry).

A writer is one registered entry: its ``--format`` name, a help line, and a loader returning the function
that writes. Every write function takes the same inputs::

    write(spec, source, aux_dir, out, manifest, *, shard_bytes, force, inputs, progress, **options) -> None

spec        the planned ``VariantSpec`` (kept heads and channels of every layer)
source      a ``TensorSource``: every base tensor by checkpoint key (``contents.plan_tensors`` cuts them)
aux_dir     a directory with the base ``config.json`` and tokenizer / generation files
out         where the variant goes; write it through ``nestprune.io.atomic`` (``output_dir`` or
            ``output_file`` with ``force`` and ``inputs``), so it appears whole or not at all
manifest    the ``VariantManifest`` to record (provenance, widths, sparsity)
shard_bytes split the output above this many bytes of tensors (where the format can)
progress    call it after each tensor with (name, bytes written, bytes in total), if given
options     the writer's own settings, named in its entry (e.g. gguf: ``gguf_type``, ``tokenizer_pre``); the
            CLI spells them ``--gguf-type`` …, and refuses them for a writer that does not take them

Loaders import their module on first use, so listing the formats (the CLI's ``--format``) stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nestprune.entries import Entries
from nestprune.errors import NestpruneError

WriteFn = Callable[..., None]
DEFAULT_FORMAT = "hf"


@dataclass(frozen=True)
class Writer:
    name: str  # the --format value
    load: Callable[[], WriteFn]  # returns the write function (importing its module)
    help: str
    loadable: bool = False  # nestprune.load_variant reads its output (so --verify can check it)
    options: tuple[str, ...] = ()  # keyword settings of its own that the write function takes

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options that are set (None = unset), refusing any this writer does not take."""
        given = {k: v for k, v in options.items() if v is not None}
        for key in given:
            if key not in self.options:
                takers = [w.name for w in WRITERS.values() if key in w.options]
                flag = "--" + key.replace("_", "-")
                where = f" (it applies to --format {' / '.join(takers)})" if takers else ""
                raise NestpruneError(f"{flag} does not apply to --format {self.name}{where}")
        return given

    def __call__(self, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.load()(*args, **kwargs, **self.check_options(options or {}))


WRITERS: Entries[Writer] = Entries("format")
register_writer = WRITERS.register
writer = WRITERS.find


def _hf() -> WriteFn:
    from nestprune.variant.hf import write_hf

    return write_hf


def _gguf() -> WriteFn:
    from nestprune.variant.gguf import write

    return write


register_writer(Writer("hf", _hf, "a Hugging Face directory: config.json, safetensors, tokenizer files", loadable=True))
register_writer(Writer("gguf", _gguf, "one GGUF file for llama.cpp (per-layer variants as arch deci)",
                       options=("gguf_type", "tokenizer_pre")))
