"""Atomic file writes that honour the umask, and up-front checks that an output is writable.

The files bnas writes whole (genotypes, checkpoints, ``model.pt``, ``.bnas`` exports, the
decoded-data cache, the compiled kernel emulator) go through :func:`atomic_path`: the data is
written to a temp file in the destination folder, then renamed over the destination, so a
reader never sees half a file and a crash or a full disk leaves the previous version intact.

The temp file is created with ``os.open(..., 0o666)`` rather than ``tempfile.mkstemp``
(which forces mode 0600): the kernel then applies the umask exactly as for a plain
``open()``, so a run folder shared between hosts that run as different users (umask 002 and
a shared group) stays readable by all of them.

:func:`check_writable_dir` and :func:`check_writable_file` prove, before any expensive work
(training, searching, packing), that an ``--out`` location can be written, and turn the
failure into a one-line :class:`~bnas.errors.BnasError` that names the flag and the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BnasError

__all__ = [
    "WriteError",
    "atomic_path",
    "check_writable_dir",
    "check_writable_file",
    "write_bytes_atomic",
    "write_text_atomic",
]

# OSError numbers that mean "this location cannot take the file" (as opposed to a bug).
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.ENAMETOOLONG,
}
# What torch.save raises (a RuntimeError, not an OSError) when the stream cannot be written,
# e.g. on a full disk: "[enforce fail at inline_container.cc] . basic_ios::clear" or
# "PytorchStreamWriter failed writing file data/0: file write failed".
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


class WriteError(BnasError):
    """A file could not be written (full disk, read-only folder, no permission)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_ERRNOS
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES)


def _create_temp(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file in ``folder``, created with mode 0666 & ~umask (like ``open()``)."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "could not find a free temp-file name", str(folder))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on a clean exit it is renamed over ``path``.

    Write the whole content to the yielded path (``torch.save(obj, tmp)``,
    ``save_file(tensors, tmp)``, ``tmp.write_text(...)``). On any exception the temp file is
    removed and ``path`` keeps its previous content. A failure of the disk or the folder (full
    disk, read-only, no permission, or torch's ``basic_ios::clear``) becomes a one-line
    :class:`WriteError` that names ``what`` and ``path`` and says the previous file is intact;
    any other exception propagates unchanged (with its traceback).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path.parent, f".{path.name}.", ".tmp")
        yield tmp
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise
        kept = "the previous file there is unchanged" if path.is_file() else "nothing was written there"
        raise WriteError(
            f"cannot write the {what} {path}: {_reason(exc)}; {kept}; free some space or choose another location"
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str = "file") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _probe_dir(folder: Path) -> str | None:
    """None if a file can be created and removed in ``folder`` (made if missing), else why not."""
    if folder.exists() and not folder.is_dir():
        return "it exists and is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(folder, ".bnas-write-check.", ".tmp")
        tmp.unlink()
    except OSError as exc:
        return _reason(exc)
    return None


def check_writable_dir(path: Path, flag: str) -> None:
    """Make the folder ``path`` if missing and prove a file can be created in it.

    Raises a one-line :class:`WriteError` ``"FLAG PATH is not writable: <reason>; choose
    another folder"`` otherwise. Call it before any long work whose results go there.
    """
    path = Path(path)
    why = _probe_dir(path)
    if why is not None:
        raise WriteError(f"{flag} {path} is not writable: {why}; choose another folder")


@contextlib.contextmanager
def new_dir_removed_on_failure(path: Path | None) -> Iterator[None]:
    """If the block fails while the folder ``path`` (missing when the block starts) is still
    empty, remove it: a run that could not start leaves no run folder behind. A folder that
    existed before, or that holds anything, is left as it is. ``None``: nothing to watch."""
    created = path is not None and not Path(path).exists()
    try:
        yield
    except BaseException:
        if created and path is not None:
            with contextlib.suppress(OSError):  # not empty (or gone): it stays as it is
                Path(path).rmdir()
        raise


def check_writable_file(path: Path, flag: str, *, example: str = "") -> None:
    """Prove that the file ``path`` can be written: not an existing folder, and its folder
    (made if missing) writable. Raises a one-line :class:`WriteError` otherwise; ``example``
    (a file name such as ``model.bnas``) is suggested when ``path`` is a folder."""
    path = Path(path)
    if path.is_dir():
        hint = f", e.g. {path / example}" if example else ""
        raise WriteError(f"{flag} {path} is an existing folder; {flag} takes a file path{hint}")
    why = _probe_dir(path.parent)
    if why is not None:
        raise WriteError(f"{flag} {path} is not writable: its folder {path.parent}: {why}; choose another folder")


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically; the format follows the suffix (png, svg, pdf)."""
    path = Path(path)
    with atomic_path(path, "picture") as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    return path
