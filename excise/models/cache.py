"""The excise cache: one folder for everything that is slow to rebuild, written atomically and checked on read.

Converted model weights, covariance statistics, SAEs and trained model organisms all live under
:func:`cache_dir` (``$EXCISE_CACHE``, default ``~/.cache/excise``). An entry is addressed by
:func:`cache_path` and keyed by what produced it: the model name plus :func:`settings_key` of the settings.

Every entry carries a manifest, a JSON record of the size and SHA-256 of each of its files. A single file
``x.safetensors`` has its manifest beside it (``x.safetensors.manifest.json``, see :func:`manifest_path`); a folder
entry has ``MANIFEST.json`` inside it. A writer first writes the data, then the manifest, each through a temporary
file or folder and an atomic rename, so a crash leaves either no entry or a complete one. A reader checks the
manifest before using the data: an entry whose manifest is missing, unreadable or does not match its files raises
:class:`CacheCorruptError`, and :func:`cached_file` / :func:`cached_folder` then log a warning, delete the entry and
build it again. A broken entry is never used.

Example::

    path = cache_path("covariance", "smollm2-135m-instruct", settings_key({"layer": 3, "n_tokens": 100_000}))
    stats = cached_safetensors(path.with_suffix(".safetensors"), build=lambda: {"cov": compute_covariance()})

The module keeps no state: the cache folder is read from the environment on every call, so tests can point
``EXCISE_CACHE`` at a temporary folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from excise.io import atomic_folder, atomic_write_text

__all__ = [
    "CACHE_ENV",
    "MANIFEST_NAME",
    "CacheCorruptError",
    "CacheMissError",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "cache_dir",
    "cache_path",
    "cached_file",
    "cached_folder",
    "cached_safetensors",
    "discard",
    "load_safetensors",
    "manifest_path",
    "settings_key",
    "sha256_file",
    "verify_file",
    "verify_folder",
    "write_file_manifest",
    "write_folder_manifest",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "EXCISE_CACHE"
"""Environment variable naming the cache folder."""

MANIFEST_NAME = "MANIFEST.json"
"""Name of the manifest inside a folder entry."""

_MANIFEST_SUFFIX = ".manifest.json"
_MANIFEST_FORMAT = 1
_HASH_BLOCK = 1 << 22


class CacheMissError(FileNotFoundError):
    """The entry does not exist at all (neither data nor manifest): build it."""


class CacheCorruptError(RuntimeError):
    """The entry exists but is incomplete or does not match its manifest: delete and rebuild it."""


def cache_dir(override: str | Path | None = None) -> Path:
    """Return the cache folder: ``override`` if given, else ``$EXCISE_CACHE`` if set, else ``~/.cache/excise``.

    The folder is not created here; writers create the folders they need.
    """
    if override is not None:
        return Path(override).expanduser().resolve()
    configured = os.environ.get(CACHE_ENV, "").strip()
    folder = Path(configured).expanduser() if configured else Path.home() / ".cache" / "excise"
    return folder.resolve()


def cache_path(*parts: str, root: str | Path | None = None) -> Path:
    """Return ``cache_dir(root) / part1 / part2 / ...``, refusing parts that would leave the cache folder.

    Raises:
        ValueError: No parts, an empty part, an absolute part, or a part containing ``..`` or a path separator.
    """
    if not parts:
        raise ValueError("cache_path needs at least one part, e.g. cache_path('models', 'smollm2-135m-instruct')")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"cache_path parts must be str, got {type(part).__name__} ({part!r})")
        if part in ("", ".", "..") or "/" in part or "\\" in part or part.startswith("~"):
            raise ValueError(
                f"invalid cache path part {part!r}: each part must be a single non-empty file or folder name"
            )
    return cache_dir(root).joinpath(*parts)


def settings_key(settings: Mapping[str, Any], *, length: int = 16) -> str:
    """Return a short, stable hex key for ``settings`` (JSON with sorted keys, hashed with SHA-256).

    Values must be JSON-serialisable; convert dtypes and paths to strings first. Two mappings with equal content
    give the same key whatever their order.
    """
    try:
        text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"settings must be JSON-serialisable (convert dtypes and paths to str): {error}") from error
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _temporary_sibling(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary file name next to ``path``; rename it onto ``path`` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    with _temporary_sibling(Path(path)) as temporary:
        temporary.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


def manifest_path(path: str | Path) -> Path:
    """Return the manifest of a single-file entry: ``x.safetensors`` -> ``x.safetensors.manifest.json``."""
    path = Path(path)
    return path.with_name(path.name + _MANIFEST_SUFFIX)


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _write_manifest(target: Path, files: Mapping[str, Path], metadata: Mapping[str, Any] | None) -> None:
    manifest = {
        "format": _MANIFEST_FORMAT,
        "files": {name: _file_record(file) for name, file in files.items()},
        "metadata": dict(metadata or {}),
    }
    atomic_write_json(target, manifest)


def _read_manifest(target: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CacheCorruptError(f"cache manifest {target} is unreadable: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise CacheCorruptError(f"cache manifest {target} has an unknown format (expected format {_MANIFEST_FORMAT})")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise CacheCorruptError(f"cache manifest {target} lists no files")
    return manifest


def _check_files(folder: Path, manifest: Mapping[str, Any], where: Path) -> None:
    for name, record in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CacheCorruptError(f"cache entry {where}: file {name!r} listed in its manifest is missing")
        size = file.stat().st_size
        if size != record.get("size"):
            raise CacheCorruptError(
                f"cache entry {where}: {name!r} has {size} bytes, its manifest records {record.get('size')} "
                "(truncated or partly written)"
            )
        if sha256_file(file) != record.get("sha256"):
            raise CacheCorruptError(f"cache entry {where}: {name!r} does not match the SHA-256 in its manifest")


def write_file_manifest(path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Record the size and SHA-256 of the finished file ``path`` (plus ``metadata``) in its manifest."""
    path = Path(path)
    target = manifest_path(path)
    _write_manifest(target, {path.name: path}, metadata)
    return target


def verify_file(path: str | Path) -> dict[str, Any]:
    """Check a single-file entry against its manifest and return the manifest's ``metadata``.

    Raises:
        CacheMissError: Neither the file nor its manifest exists.
        CacheCorruptError: Only one of them exists, or the file's size or SHA-256 differs from the manifest.
    """
    path = Path(path)
    target = manifest_path(path)
    if not path.exists() and not target.exists():
        raise CacheMissError(f"no cache entry at {path}")
    if not target.exists():
        raise CacheCorruptError(f"cache entry {path} has no manifest (the write was interrupted)")
    manifest = _read_manifest(target)
    if list(manifest["files"]) != [path.name]:
        raise CacheCorruptError(f"cache manifest {target} describes {list(manifest['files'])}, not {path.name!r}")
    _check_files(path.parent, manifest, path)
    return dict(manifest.get("metadata", {}))


def write_folder_manifest(folder: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``MANIFEST.json`` into ``folder``, recording every file below it (call it last, before the rename)."""
    folder = Path(folder)
    files = {
        file.relative_to(folder).as_posix(): file
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != MANIFEST_NAME
    }
    if not files:
        raise ValueError(f"cannot write a manifest for {folder}: it contains no files")
    target = folder / MANIFEST_NAME
    _write_manifest(target, files, metadata)
    return target


def verify_folder(folder: str | Path) -> dict[str, Any]:
    """Check a folder entry against its ``MANIFEST.json`` and return the manifest's ``metadata``.

    Raises:
        CacheMissError: The folder does not exist.
        CacheCorruptError: The manifest is missing or unreadable, or a listed file is missing or differs.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CacheMissError(f"no cache entry at {folder}")
    target = folder / MANIFEST_NAME
    if not target.is_file():
        raise CacheCorruptError(f"cache entry {folder} has no {MANIFEST_NAME} (the write was interrupted)")
    manifest = _read_manifest(target)
    _check_files(folder, manifest, folder)
    return dict(manifest.get("metadata", {}))


def discard(path: str | Path) -> None:
    """Delete a cache entry: a folder, or a file together with its manifest. Missing parts are ignored."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
        manifest_path(path).unlink(missing_ok=True)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Save ``tensors`` to ``path`` as safetensors atomically, then write its manifest.

    ``metadata`` (str to str, as safetensors requires) is stored both in the safetensors header and in the
    manifest. Tensors are made contiguous and moved to the CPU first; tensors sharing memory must be cloned by
    the caller (safetensors refuses shared storage).
    """
    path = Path(path)
    header = dict(metadata or {})
    for key, value in header.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    # The manifest goes last: a crash between the two renames leaves data without a manifest, which reads as
    # corrupt and is rebuilt.
    manifest_path(path).unlink(missing_ok=True)
    with _temporary_sibling(path) as temporary:
        safetensors.torch.save_file(contiguous, str(temporary), metadata=header or None)
    write_file_manifest(path, header)


def load_safetensors(path: str | Path, *, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check ``path`` against its manifest, then load it; return ``(tensors, metadata)``.

    Raises:
        CacheMissError: No entry at ``path``.
        CacheCorruptError: The entry is incomplete or its checksum differs; see :func:`cached_safetensors`.
    """
    metadata = verify_file(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device=device)
    except Exception as error:  # the safetensors parser raises its own error types
        raise CacheCorruptError(
            f"cache entry {path} passed its checksum but is not valid safetensors: {error}"
        ) from error
    return tensors, {str(key): str(value) for key, value in metadata.items()}


def _rebuild_note(path: Path, error: CacheCorruptError) -> None:
    logger.warning("Rebuilding broken cache entry %s: %s", path, error)
    discard(path)


def cached_file(path: str | Path, build: Callable[[Path], None], metadata: Mapping[str, Any] | None = None) -> Path:
    """Return ``path`` once it is a verified single-file entry, calling ``build(temporary_path)`` if needed.

    ``build`` writes the file to the path it is given; it is then renamed onto ``path`` and its manifest written.
    A corrupt entry is logged, deleted and rebuilt.
    """
    path = Path(path)
    try:
        verify_file(path)
        return path
    except CacheMissError:
        pass
    except CacheCorruptError as error:
        _rebuild_note(path, error)
    with _temporary_sibling(path) as temporary:
        build(temporary)
    write_file_manifest(path, metadata)
    return path


def cached_safetensors(
    path: str | Path,
    build: Callable[[], Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Load the safetensors entry at ``path``, computing and saving it with ``build()`` when missing or broken."""
    path = Path(path)
    try:
        return load_safetensors(path, device=device)[0]
    except CacheMissError:
        pass
    except CacheCorruptError as error:
        _rebuild_note(path, error)
    atomic_save_safetensors(build(), path, metadata)
    return load_safetensors(path, device=device)[0]


def cached_folder(folder: str | Path, build: Callable[[Path], None], metadata: Mapping[str, Any] | None = None) -> Path:
    """Return ``folder`` once it is a verified folder entry, calling ``build(temporary_folder)`` if needed.

    ``build`` fills the empty temporary folder it is given; the manifest is then written into it and the folder
    renamed onto ``folder``. If ``build`` raises, nothing is left behind. A corrupt entry is logged, deleted and
    rebuilt.

    NOTE: there is no lock. Processes that miss the same entry at the same time each build it and the last rename
    wins; a reader caught between two renames sees a missing or corrupt entry and builds it once more.
    """
    folder = Path(folder)
    try:
        verify_folder(folder)
        return folder
    except CacheMissError:
        pass
    except CacheCorruptError as error:
        _rebuild_note(folder, error)
    with atomic_folder(folder) as temporary:
        build(temporary)
        write_folder_manifest(temporary, metadata)
    return folder
