"""``nestprune push | pull | list | tag | untag | rm | gc | cache prune``: publish once, let serving teams pull any
size, and keep the registry and the chunk cache from growing forever."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
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
JobsOption = Annotated[int, typer.Option("--jobs", "-j", min=1, max=256, help="concurrent transfers (ranged reads, uploads, multipart parts) and writer threads")]
DEFAULT_JOBS = 8  # = nestprune.registry.stores.DEFAULT_JOBS (not imported: keeps --help light)


def warn(lines) -> None:
    for line in lines:
        console.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def push(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="build artifact (from `nestprune build`)")],
    base: Annotated[Path, typer.Option("--base", help="the base model directory the artifact was built from")],
    registry: Annotated[str | None, typer.Argument(metavar="[REGISTRY]", help=REGISTRY_HELP)] = None,
    name: Annotated[str | None, typer.Option("--name", help="model name (default: the base directory's name)")] = None,
    tag: Annotated[str, typer.Option("--tag", help="tag to point at the new version (latest is always moved too)")] = "latest",
    channel_block: Annotated[int, typer.Option("--channel-block", min=1, help="MLP channels per chunk")] = 32,
    jobs: JobsOption = DEFAULT_JOBS,
) -> None:
    """Publish ARTIFACT with the weights of --base in the nested order, as a new immutable version."""
    from nestprune.registry import push as do_push

    columns = (TextColumn("push"), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not is_tty()) as progress:
        task = progress.add_task("push", total=None)
        res = do_push(registry, artifact, base, name=name, tag=tag, channel_block=channel_block,
                      on_bytes=lambda n: progress.advance(task, n), jobs=jobs)
    r = res.record
    console.print(
        f"pushed [bold]{r.name}@sha256:{r.digest[:12]}[/] ({_mib(res.bytes_total)}, {_mib(res.bytes_written)} new) "
        f"tagged {', '.join(dict.fromkeys((res.tag, 'latest')))}", highlight=False, soft_wrap=True,
    )
    warn(res.warnings)
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
    jobs: JobsOption = DEFAULT_JOBS,
) -> None:
    """Write a size variant of REF, reading and verifying only the chunks it keeps.

    The directory is byte-identical to what `nestprune materialize` writes for the same artifact and base.
    """
    from nestprune.registry.pull import pull as do_pull
    from nestprune.registry.source import TransferStats
    from nestprune.variant.materialize import check_target
    check_target(sparsity, params)
    n_params = parse_params(params) if params is not None else None
    columns = (TextColumn("pull"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=True, disable=not is_tty()) as progress:
        task = progress.add_task("pull", total=None, info="")
        stats = TransferStats(on_update=lambda s: progress.update(
            task, info=f"read {_mib(s.fetched)}, {_mib(s.cached)} from cache"))
        res = do_pull(ref, out_dir, sparsity=sparsity, params=n_params, layout=layout.value,
                      multiple_of=multiple_of, force=force, stats=stats, format=format.value,
                      writer_options={"gguf_type": gguf_type, "tokenizer_pre": tokenizer_pre}, jobs=jobs,
                      progress=lambda name, done, total: progress.update(task, completed=done, total=total),
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
        f"variant {_mib(res.variant_bytes)}; {s.seconds:.1f}s ({_mib(int(s.rate))}/s)"
        + (f"; {s.retries} request(s) retried" if s.retries else ""), highlight=False, soft_wrap=True,
    )


def list_cmd(
    registry: Annotated[str | None, typer.Argument(metavar="[REGISTRY]", help=REGISTRY_HELP)] = None,
) -> None:
    """List names, versions (digest, size, date) and tags of a registry."""
    from nestprune.registry import list_registry, open_store

    problems: list[str] = []
    index = list_registry(open_store(registry), problems)
    warn(problems)
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


def untag(
    ref: Annotated[str, typer.Argument(metavar="REF", help="REGISTRY/NAME:TAG of the tag to delete (its version stays)")],
) -> None:
    """Delete a tag. The version it named stays published (remove it with `nestprune rm`)."""
    from nestprune.errors import NestpruneError
    from nestprune.registry import open_store, parse_reference
    from nestprune.registry.gc import remove_tag

    r = parse_reference(ref)
    if r.tag is None:
        raise NestpruneError(f"{ref!r} names no tag: expected REGISTRY/NAME:TAG")
    digest, warnings = remove_tag(open_store(r.registry), r.name, r.tag)
    warn(warnings)
    console.print(f"removed tag {r.name}:{r.tag} (it named sha256:{digest[:12]})", highlight=False)


def rm(
    ref: Annotated[str, typer.Argument(metavar="REF", help="REGISTRY/NAME@DIGEST (or NAME:TAG) of the version to remove")],
) -> None:
    """Unpublish a version and the tags naming it. Its bytes are freed by the next `nestprune gc`."""
    from nestprune.registry import open_store, parse_reference, resolve
    from nestprune.registry.gc import remove_version

    r = parse_reference(ref)
    store = open_store(r.registry)
    res = remove_version(store, r.name, resolve(store, r).digest)
    warn(res.warnings)
    tags = f" and its tag(s) {', '.join(res.tags)}" if res.tags else ""
    console.print(f"removed {res.name}@sha256:{res.digest[:12]}{tags}; run `nestprune gc` to free its bytes",
                  highlight=False, soft_wrap=True)


def gc(
    registry: Annotated[str | None, typer.Argument(metavar="[REGISTRY]", help=REGISTRY_HELP)] = None,
    yes: Annotated[bool, typer.Option("--yes", help="delete (without it, only report what would be deleted)")] = False,
    grace: Annotated[float, typer.Option("--grace", min=0.0, help="hours an unreferenced blob must have existed before it may go (protects pushes in flight)")] = 1.0,
) -> None:
    """Remove blobs no version references (what removed versions and interrupted pushes left).

    A dry run by default: pass --yes to delete. Blobs younger than --grace hours and blobs a push in flight
    uses are always kept.
    """
    from nestprune.registry import open_store
    from nestprune.registry.gc import gc as do_gc

    res = do_gc(open_store(registry), grace_s=grace * 3600, dry_run=not yes)
    warn(res.problems)
    verb = "would free" if res.dry_run else "freed"
    count = len(res.candidates) if res.dry_run else res.deleted
    out.print(f"{verb} {_mib(res.freed)} in {count} unreferenced blob(s); kept {res.reachable} referenced and "
              f"{res.young} younger than {grace:g} h, of {res.total} blob(s)"
              + (f"; {res.dead_leases} dead push lease(s)" if res.dead_leases else ""), highlight=False, soft_wrap=True)
    if res.dry_run and count:
        console.print("dry run: nothing was deleted; pass --yes to delete", highlight=False)


cache_app = typer.Typer(help="The local chunk cache of remote pulls ($NESTPRUNE_CACHE or ~/.cache/nestprune/chunks).",
                        no_args_is_help=True)


@cache_app.command("prune")
def cache_prune(
    max_size: Annotated[str | None, typer.Option("--max-size", help="shrink to this size (e.g. 10G, 0 to empty); default: the cap, $NESTPRUNE_CACHE_MAX or 64G")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache", help="the cache directory (default $NESTPRUNE_CACHE or ~/.cache/nestprune/chunks)")] = None,
) -> None:
    """Delete least recently used cache entries until the cache fits its size cap (or --max-size)."""
    from nestprune.registry.cache import ChunkCache, parse_size

    cache = ChunkCache(cache_dir)
    res = cache.trim(parse_size(max_size) if max_size is not None else None)
    out.print(f"removed {res.removed} entr{'y' if res.removed == 1 else 'ies'} ({_mib(res.freed)}) from {cache.root}; "
              f"{_mib(res.kept)} left", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("push")(friendly(push))
    app.command("pull")(friendly(pull))
    app.command("list")(friendly(list_cmd))
    app.command("tag")(friendly(tag))
    app.command("untag")(friendly(untag))
    app.command("rm")(friendly(rm))
    app.command("gc")(friendly(gc))
    for cmd in cache_app.registered_commands:
        cmd.callback = friendly(cmd.callback)
    app.add_typer(cache_app, name="cache")
