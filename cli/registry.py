"""``nestprune push | pull | list | tag``: publish once, let serving teams pull any size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from nestprune.cli.common import console, friendly, is_tty, out
from nestprune.cli.materialize import (  # the same targets, shapes and formats as `nestprune materialize`
    DEFAULT_FORMAT_CHOICE,
    DEFAULT_LAYOUT,
    ForceOption,
    FormatOption,
    GgufTypeOption,
    LayoutOption,
    MultipleOfOption,
    ParamsOption,
    SparsityOption,
    TokenizerPreOption,
    parse_params,
    reach_warning,
)

REGISTRY_HELP = "a directory (default ~/.cache/nestprune/registry), s3://bucket/prefix or https://host/prefix"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def push(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="build artifact (from `nestprune build`)")],
    base: Annotated[Path, typer.Option("--base", help="the base model directory the artifact was built from")],
    registry: Annotated[str | None, typer.Argument(metavar="[REGISTRY]", help=REGISTRY_HELP)] = None,
    name: Annotated[str | None, typer.Option("--name", help="model name (default: the base directory's name)")] = None,
    tag: Annotated[str, typer.Option("--tag", help="tag to point at the new version (latest is always moved too)")] = "latest",
    channel_block: Annotated[int, typer.Option("--channel-block", min=1, help="MLP channels per chunk")] = 32,
) -> None:
    """Publish ARTIFACT with the weights of --base in the nested order, as a new immutable version."""
    from nestprune.registry import push as do_push

    columns = (TextColumn("push"), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not is_tty()) as progress:
        task = progress.add_task("push", total=None)
        res = do_push(registry, artifact, base, name=name, tag=tag, channel_block=channel_block,
                      on_bytes=lambda n: progress.advance(task, n))
    r = res.record
    console.print(
        f"pushed [bold]{r.name}@sha256:{r.digest[:12]}[/] ({_mib(res.bytes_total)}, {_mib(res.bytes_written)} new) "
        f"tagged {', '.join(dict.fromkeys((res.tag, 'latest')))}", highlight=False, soft_wrap=True,
    )
    out.print(f"sha256:{r.digest}", highlight=False)


def pull(
    ref: Annotated[str, typer.Argument(metavar="REF", help="REGISTRY/NAME[:TAG|@DIGEST] (no REGISTRY: the default local one)")],
    out_dir: Annotated[Path, typer.Option("--out", help="variant directory to write")],
    sparsity: SparsityOption = None,
    params: ParamsOption = None,
    layout: LayoutOption = DEFAULT_LAYOUT,
    multiple_of: MultipleOfOption = None,
    force: ForceOption = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not use or fill the local chunk cache ($NESTPRUNE_CACHE or ~/.cache/nestprune/chunks; used for S3 and HTTP registries)")] = False,
    format: FormatOption = DEFAULT_FORMAT_CHOICE,
    gguf_type: GgufTypeOption = None,
    tokenizer_pre: TokenizerPreOption = None,
) -> None:
    """Write a size variant of REF, reading and verifying only the chunks it keeps.

    The directory is byte-identical to what `nestprune materialize` writes for the same artifact and base.
    """
    from nestprune.registry.pull import pull as do_pull
    from nestprune.registry.source import TransferStats
    from nestprune.variant.materialize import check_target
    check_target(sparsity, params)
    n_params = parse_params(params) if params is not None else None
    columns = (TextColumn("pull"), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=True, disable=not is_tty()) as progress:
        task = progress.add_task("pull", total=None, info="")
        stats = TransferStats(on_update=lambda s: progress.update(
            task, completed=s.fetched, info=f"{_mib(s.cached)} from cache"))
        res = do_pull(ref, out_dir, sparsity=sparsity, params=n_params, layout=layout.value,
                      multiple_of=multiple_of, force=force, stats=stats, format=format.value,
                      writer_options={"gguf_type": gguf_type, "tokenizer_pre": tokenizer_pre},
                      **({"cache": None} if no_cache else {}))
    s, m = res.stats, res.manifest
    console.print(
        f"wrote [bold]{res.out_dir}[/] from {res.record.name}@sha256:{res.record.digest[:12]}: "
        f"sparsity {m.requested_sparsity:.4f} requested, {m.achieved_sparsity:.4f} achieved, "
        f"{m.total_params:,} parameters ({m.layout})", highlight=False, soft_wrap=True,
    )
    reach_warning(res.spec, n_params)
    console.print(
        f"read {_mib(s.fetched)} from the registry in {s.requests} request(s), {_mib(s.cached)} from the cache; "
        f"variant {_mib(res.variant_bytes)}; {s.seconds:.1f}s ({_mib(int(s.rate))}/s)", highlight=False, soft_wrap=True,
    )


def list_cmd(
    registry: Annotated[str | None, typer.Argument(metavar="[REGISTRY]", help=REGISTRY_HELP)] = None,
) -> None:
    """List names, versions (digest, size, date) and tags of a registry."""
    from nestprune.registry import list_registry, open_store

    index = list_registry(open_store(registry))
    if not index.models:
        console.print(f"no models in {registry or 'the default registry'}")
        return
    table = Table("name", "version", "size", "created", "tags", box=None)
    for name, entry in index.models.items():
        by_digest: dict[str, list[str]] = {}
        for tag, digest in entry.tags.items():
            by_digest.setdefault(digest, []).append(tag)
        for v in entry.versions:
            table.add_row(name, f"sha256:{v.digest[:12]}", _mib(v.total_size), v.created_at,
                          ", ".join(by_digest.get(v.digest, [])))
    out.print(table)


def tag(
    ref: Annotated[str, typer.Argument(metavar="REF", help="REGISTRY/NAME[:TAG|@DIGEST] of the version to tag")],
    new_tag: Annotated[str, typer.Argument(metavar="NEW_TAG", help="tag to create or move")],
) -> None:
    """Point NEW_TAG at the version REF resolves to (tags are mutable; versions never change)."""
    from nestprune.registry import open_store, parse_reference, set_tag

    r = parse_reference(ref)
    record = set_tag(open_store(r.registry), r, new_tag)
    console.print(f"{record.name}:{record.tag} -> sha256:{record.digest[:12]}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("push")(friendly(push))
    app.command("pull")(friendly(pull))
    app.command("list")(friendly(list_cmd))
    app.command("tag")(friendly(tag))
