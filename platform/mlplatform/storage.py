"""Storage every node reaches: URIs under a configured root (``s3://...`` through pyarrow), and folders carried by value.

A node of a Ray cluster shares nothing with the driver but the network, so a workload never hands
an actor a path on the driver's disk. What it hands over is one of:

- a storage URI (``s3://bucket/key``, ``gs://...``, or a path on storage every node mounts), read
  and written through ``pyarrow.fs``; a relative path is placed under ``$MLPLATFORM_STORAGE``, the
  root URI a cluster configures for every node, or under the working folder when none is set;
- a :class:`PortableFolder`: the files of a small folder (a tokenizer, a model) carried inside the
  task's arguments, through Ray's object store, and unpacked into the node's own cache.

Credentials and the endpoint of an S3-compatible store come from the usual AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), never from a URI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

STORAGE_ENV = "MLPLATFORM_STORAGE"
"""The environment variable naming the storage root every node reaches (e.g. ``s3://mlplatform``)."""


class StorageError(OSError):
    """A storage URI that cannot be read or written; the message names the URI, never credentials."""


def cache_dir() -> Path:
    """This node's cache for built and downloaded artefacts: ``$MLPLATFORM_HOME`` or ``~/.cache/mlplatform``."""
    return Path(os.environ.get("MLPLATFORM_HOME", Path.home() / ".cache" / "mlplatform"))


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations (``s3://``, ``gs://``, ``file://``), False for plain paths."""
    return "://" in location and bool(urlsplit(location).scheme)


def storage_root() -> str | None:
    """``$MLPLATFORM_STORAGE`` without a trailing slash, or None when the cluster configures none."""
    root = os.environ.get(STORAGE_ENV, "").strip()
    return root.rstrip("/") or None


def resolve(location: str) -> str:
    """Where ``location`` lives for every process of the run.

    URIs and absolute paths stay as they are. A relative path goes under the storage root when
    ``$MLPLATFORM_STORAGE`` is set (so ``checkpoints/apex`` becomes ``s3://mlplatform/checkpoints/apex``
    on a cluster), else under this process's working folder, made absolute.
    """
    location = os.path.expanduser(location)
    if is_uri(location) or os.path.isabs(location):
        return location
    root = storage_root()
    if root is not None:
        return f"{root}/{Path(os.path.normpath(location)).as_posix()}"
    return str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    """``location`` with ``parts`` appended, ``/``-separated for URIs."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(location if is_uri(location) else str(Path(location).resolve()))
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot open storage {_shown(location)}: {_first_line(e)}") from None


def exists(location: str) -> bool:
    """True when a file is stored at ``location``."""
    filesystem, path = _filesystem(location)
    try:
        return filesystem.get_file_info(path).type == pafs.FileType.File
    except OSError as e:
        raise StorageError(f"cannot look at {_shown(location)}: {_first_line(e)}") from None


def read_bytes(location: str) -> bytes:
    """The whole file at ``location``.

    Raises:
        FileNotFoundError: nothing is stored there.
        StorageError: the storage cannot be read.
    """
    filesystem, path = _filesystem(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing stored at {_shown(location)}") from None
    except OSError as e:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"nothing stored at {_shown(location)}") from None
        raise StorageError(f"cannot read {_shown(location)}: {_first_line(e)}") from None


def write_bytes(location: str, data: bytes) -> None:
    """Store ``data`` at ``location``, whole or not at all.

    An object store makes an upload visible only once it completes; on a file system the data goes
    to a temporary file beside the target first and is renamed over it, so a reader never sees half
    a checkpoint and a crash mid-write keeps the previous one.

    Raises:
        StorageError: the storage cannot be written.
    """
    filesystem, path = _filesystem(location)
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=Path(path).parent, prefix=f".{Path(path).name}.", delete=False) as scratch:
                scratch.write(data)
            os.replace(scratch.name, path)
            return
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {_shown(location)}: {_first_line(e)}") from None


def list_folders(location: str) -> list[str]:
    """The names of the folders directly under ``location`` (none when it does not exist)."""
    filesystem, path = _filesystem(location)
    try:
        found = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {_shown(location)}: {_first_line(e)}") from None
    return sorted(info.base_name for info in found if info.type == pafs.FileType.Directory)


@dataclasses.dataclass(frozen=True)
class PortableFolder:
    """The files of a small folder, carried by value to whichever node needs them.

    Pickled into a task's arguments, it travels through Ray's object store; :meth:`materialize`
    unpacks it once per node into that node's cache, under a name that includes the content's
    digest, so two versions never mix and a node that has it already does nothing.

    Args:
        name: the folder's own name (kept for readable cache paths).
        files: (relative path, contents) of every file, sorted by path.
    """

    name: str
    files: tuple[tuple[str, bytes], ...]

    @classmethod
    def read(cls, folder: str | Path) -> PortableFolder:
        """Every file under ``folder``.

        Raises:
            FileNotFoundError: ``folder`` is not a folder.
        """
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"no folder at {str(folder)!r}")
        files = tuple((path.relative_to(root).as_posix(), path.read_bytes()) for path in sorted(root.rglob("*")) if path.is_file())
        return cls(root.name, files)

    @property
    def digest(self) -> str:
        """A content hash over every path and file."""
        digest = hashlib.sha256()
        for relative, contents in self.files:
            digest.update(relative.encode() + b"\0" + hashlib.sha256(contents).digest())
        return digest.hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        """Total size of the files."""
        return sum(len(contents) for _, contents in self.files)

    def local_path(self) -> str:
        """Where this node has the folder (see :meth:`materialize`)."""
        return str(self.materialize())

    def materialize(self, root: str | Path | None = None) -> Path:
        """This folder on the local disk (``<cache>/portable/<name>-<digest>``), unpacked on first use.

        The copy appears whole or not at all: it is written into a scratch folder and renamed into
        place, so processes that ask at once never read half of it.
        """
        target = Path(root or cache_dir()) / "portable" / f"{self.name}-{self.digest}"
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        for relative, contents in self.files:
            (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
            (scratch / relative).write_bytes(contents)
        try:
            os.rename(scratch, target)
        except OSError:  # another process of this node unpacked it first
            shutil.rmtree(scratch, ignore_errors=True)
            if not target.is_dir():
                raise
        return target


def portable(location: str) -> PortableFolder | str:
    """A folder on this machine as a :class:`PortableFolder`; anything else (a hub name, a URI) as it is."""
    path = Path(location).expanduser()
    return PortableFolder.read(path) if not is_uri(location) and path.is_dir() else location


def local_path(source: PortableFolder | str | Any) -> str:
    """Where ``source`` is on this node: a carried folder unpacked, a registry version downloaded, a name as it is."""
    return source if isinstance(source, str) else source.local_path()


def _shown(location: str) -> str:
    """A location fit for an error message: no user, password or query string (they may hold secrets)."""
    if not is_uri(location):
        return repr(location)
    parts = urlsplit(location)
    return repr(f"{parts.scheme}://{parts.hostname or ''}{parts.path}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
