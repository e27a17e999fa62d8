"""Output formats: a variant is kept widths (``nestprune.variant.widths``) × a writer (this registry).

A writer is one registered entry: its ``--format`` name, a help line, and a loader returning the function
that writes. Every write function takes the same inputs::

    write(spec, source, aux_dir, out, manifest, *, shard_bytes, force, inputs, progress) -> None

spec        the planned ``VariantSpec`` (kept heads and channels of every layer)
source      a ``TensorSource``: every base tensor by checkpoint key (``contents.plan_tensors`` cuts them)
aux_dir     a directory with the base ``config.json`` and tokenizer / generation files
out         where the variant goes; write it through ``nestprune.io.atomic`` (``output_dir`` or
            ``output_file`` with ``force`` and ``inputs``), so it appears whole or not at all
manifest    the ``VariantManifest`` to record (provenance, widths, sparsity)
shard_bytes split the output above this many bytes of tensors (where the format can)
progress    call it after each tensor with (name, bytes written, bytes in total), if given

Loaders import their module on first use, so listing the formats (the CLI's ``--format``) stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nestprune.entries import Entries

WriteFn = Callable[..., None]
DEFAULT_FORMAT = "hf"


@dataclass(frozen=True)
class Writer:
    name: str  # the --format value
    load: Callable[[], WriteFn]  # returns the write function (importing its module)
    help: str
    loadable: bool = False  # nestprune.load_variant reads its output (so --verify can check it)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.load()(*args, **kwargs)


WRITERS: Entries[Writer] = Entries("format")
register_writer = WRITERS.register
writer = WRITERS.find


def _hf() -> WriteFn:
    from nestprune.variant.hf import write_hf

    return write_hf


register_writer(Writer("hf", _hf, "a Hugging Face directory: config.json, safetensors, tokenizer files", loadable=True))
