"""Tar archives of datasets: extracted once into a cache folder, and searched for a dataset's root folder.

An archive is extracted into ``cache_dir`` (default ``~/.cache/fedml_prism``) under a folder named after
the archive plus a short hash of its absolute path, size and modification time; a marker file written
after a complete extraction lets later calls reuse the folder without touching the archive again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_CACHE_DIR = Path("~/.cache/fedml_prism")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar")
_EXTRACTED_MARKER = ".fedml_prism_extracted"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not target.is_relative_to(root) or member.issym() or member.islnk() or member.isdev():
            raise ValueError(f"refusing to extract unsafe archive member {member.name!r}")
    tar.extractall(dest)


def extract_once(archive: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Extract a tar archive into ``cache_dir`` unless an earlier call already did; returns the folder."""
    archive = Path(archive)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    stat = archive.stat()
    key = f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    dest = cache / f"{_archive_stem(archive)}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (dest / _EXTRACTED_MARKER).exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=cache))
    tmp.chmod(0o755)
    try:
        try:
            with tarfile.open(archive) as tar:
                _safe_extract(tar, tmp)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"cannot extract archive {archive}: {err}") from err
        (tmp / _EXTRACTED_MARKER).write_text(str(archive.resolve()) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _EXTRACTED_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_root(
    path: Path,
    candidates: Callable[[Path], Iterable[Path]],
    is_root: Callable[[Path], bool],
    archive_globs: tuple[str, ...],
    cache_dir: str | os.PathLike[str] | None,
    allow_archives: bool = True,
) -> Path | None:
    """The first folder accepted by ``is_root`` reachable from ``path`` (a folder or an archive)."""
    if allow_archives and is_archive(path):
        return find_root(extract_once(path, cache_dir), candidates, is_root, archive_globs, cache_dir, False)
    if not path.is_dir():
        return None
    for candidate in candidates(path):
        if is_root(candidate):
            return candidate
    if allow_archives:
        for pattern in archive_globs:
            for archive in sorted(path.glob(pattern)):
                if is_archive(archive):
                    found = find_root(archive, candidates, is_root, archive_globs, cache_dir, True)
                    if found is not None:
                        return found
    return None
