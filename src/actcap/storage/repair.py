"""Finding and unlisting damaged finished samples, so a resume answers them again.

A finished sample's file must exist, its header parse with every tensor inside the file, and
name the sample's id; a shard range must lie inside its shard and (locally) parse likewise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from actcap.errors import FormatError
from actcap.storage.format import ShardSlice
from actcap.storage.header import check_question_id, parse_header, read_header
from actcap.storage.location import PathOrUrl, is_url, local_path, open_fd, url_fs
from actcap.storage.manifest import ManifestEntry, merged_manifest, replace_manifest
from actcap.storage.prefixes import PREFIX_KEY
from actcap.storage.reader import prefix_fault
from actcap.storage.safety import NOFOLLOW, RunDirs


def damaged_samples(root: PathOrUrl, entries: Iterable[ManifestEntry]) -> dict[str, str]:
    """Finished samples whose activations are not there whole: sample id to why.

    A file must exist and its safetensors header parse, with every tensor inside the file, and
    name the sample's id (``extra.question_id``) where it names one; a shard range must lie
    inside its shard and (locally) its header parse and name the id likewise. At a URL only the
    shards' sizes are checked (one request per shard, not one per sample).
    """
    text = os.fspath(root)
    real_root = None if is_url(text) else os.path.realpath(local_path(text))
    bad: dict[str, str] = {}
    slices: dict[str, list[tuple[ManifestEntry, ShardSlice]]] = {}
    for e in entries:
        try:
            source = e.source(text, real_root)
            if isinstance(source, Path):
                check_question_id(read_header(source), e.id, str(source))
            elif isinstance(source, ShardSlice):
                slices.setdefault(source.shard, []).append((e, source))
        except FormatError as err:
            bad[e.id] = str(err)
    for shard, items in slices.items():
        bad.update(_damaged_in_shard(shard, items))
    bad.update(_damaged_prefixes(text, real_root, entries, bad))
    return bad


def _damaged_prefixes(
    root: str, real_root: str | None, entries: Iterable[ManifestEntry], bad: Mapping[str, str]
) -> dict[str, str]:
    """The samples whose shared prefix (checked once per prefix) is missing or damaged."""
    users: dict[str, list[str]] = {}
    for e in entries:
        key = e.record.get(PREFIX_KEY)
        if key is not None and e.file is not None and e.id not in bad:
            users.setdefault(str(key), []).append(e.id)
    out: dict[str, str] = {}
    for key, ids in users.items():
        why = prefix_fault(root, key, real_root)
        if why is not None:
            out.update({i: f"{why}; {len(ids)} sample(s) use it" for i in ids})
    return out


def _damaged_in_shard(shard: str, items: list[tuple[ManifestEntry, ShardSlice]]) -> dict[str, str]:
    """The samples of one shard whose byte range is missing, cut short or not safetensors."""
    fd = -1
    try:
        if is_url(shard):
            fs, path = url_fs(shard)
            size = int(fs.size(path))
        else:
            fd = open_fd(shard, NOFOLLOW)
            size = os.fstat(fd).st_size
    except OSError as err:
        return {e.id: f"{shard}: cannot read the shard ({err})." for e, _ in items}
    bad: dict[str, str] = {}
    try:
        for e, part in items:
            end = part.offset + part.length
            if end > size:
                bad[e.id] = f"{part}: the shard has {size} bytes, the sample ends at {end}."
            elif fd >= 0:
                try:
                    header = parse_header(_reader_at(fd, part.offset), part.length, str(part))
                    check_question_id(header, e.id, str(part))
                except FormatError as err:
                    bad[e.id] = str(err)
    finally:
        if fd >= 0:
            os.close(fd)
    return bad


def _reader_at(fd: int, base: int) -> Callable[[int, int], bytes]:
    """``read(start, n)`` over a file's bytes from ``base`` on."""
    return lambda start, n: os.pread(fd, n, base + start)


def drop_damaged(dirs: RunDirs, entries: list[ManifestEntry]) -> list[ManifestEntry]:
    """Check every finished sample of a run being resumed; unlist those to redo.

    The manifest is rewritten whole without them (and any segments folded into it) and renamed
    into place, so readers, which keep the first line of an id, see only the redone sample.

    Returns:
        The entries still finished.
    """
    bad = damaged_samples(dirs.root, entries)
    if not bad:
        return entries
    warn_redone(dirs.root, bad)
    ordered, data = merged_manifest(dirs.root, None, exclude=bad)
    replace_manifest(dirs, data)
    return ordered


def warn_redone(root: PathOrUrl, bad: Mapping[str, str]) -> None:
    """Warn that damaged finished samples will be answered again, with the first reasons."""
    shown = "; ".join(f"{i}: {why}" for i, why in list(bad.items())[:3])
    more = " ..." if len(bad) > 3 else ""
    warnings.warn(
        f"{os.fspath(root)}: {len(bad)} finished sample(s) missing or damaged, answered again: "
        f"{shown}{more}",
        stacklevel=4,
    )
