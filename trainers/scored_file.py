"""The files of the ``align-losses logps`` command: the partial file of scored chunks and the output's
temporary file.

The command writes only two paths besides ``--out`` itself:

* ``<out>.partial``, the scored values of every chunk of rows as it is done (one JSON line per chunk, after a
  header line that records the run's settings), flushed to disk chunk by chunk. It is created exclusively
  (``O_CREAT | O_EXCL``: an existing file or link of that name is never replaced or followed), kept when the
  run is interrupted or fails, so that ``--resume`` continues from it, and removed once ``--out`` is written.
  ``--resume`` opens it without following a link and only when its header is this command's and its
  settings are the run's. The run holds an exclusive advisory lock (``flock``) on it, so that a second run
  on the same ``--out`` is refused rather than appending the same rows.
* a temporary file with a unique name in the output's folder (``tempfile.mkstemp``: exclusive, no link
  followed), holding the whole output until it atomically replaces ``--out``; removed on any failure.

The output is always built from the partial file's values read back, so an interrupted run continued with
``--resume`` gives the same file as an uninterrupted one (JSON keeps every float exactly).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the exclusive creation still guards a fresh run
    fcntl = None
from typing import Callable, Optional

#: First key of the partial file's header line, with the format's version.
MAGIC = "align_losses_logps_partial"
VERSION = 1


class PartialFileError(Exception):
    """The partial file cannot be used (a link, someone else's file, other settings): a message for the user."""


def _lock(fd: int, path: Path) -> None:
    """Hold an exclusive advisory lock on the open partial file for the run, so that a second run on the same
    --out (a racing ``--resume``) is refused instead of appending the same rows to it."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PartialFileError(
            f"{path} is in use by another run writing the same --out; wait for it to end, or choose another --out"
        ) from None
    except OSError as e:  # a file system without locks (some network mounts): run unlocked, as without fcntl
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def partial_path(out: str) -> Path:
    """Where the scored chunks of a run writing ``out`` are kept."""
    target = Path(out)
    return target.with_name(target.name + ".partial")


class PartialFile:
    """The scored chunks of one run (see the module docstring). Use `create` or `resume`."""

    def __init__(self, path: Path, fd: int, settings: dict, chunks: list):
        self.path, self._fd, self.settings = path, fd, settings
        #: ``[(start, stop, {name: [values]})]`` in row order, as read back or appended.
        self.chunks = chunks

    @classmethod
    def create(cls, path: Path, settings: dict) -> "PartialFile":
        """A new partial file at ``path``; PartialFileError if anything (a file, a link) is there already."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            raise PartialFileError(
                f"{path} exists: an earlier run writing the same --out was interrupted (or it is another file); "
                f"pass --resume to continue that run, or remove {path}"
            ) from None
        try:
            _lock(fd, path)
        except BaseException:  # another run opened it first with --resume: its file, left in place
            os.close(fd)
            raise
        settings = normalised(settings)
        partial = cls(path, fd, settings, [])
        try:
            partial._write({MAGIC: VERSION, "settings": settings})
        except BaseException:
            partial.close()
            path.unlink()
            raise
        return partial

    @classmethod
    def resume(cls, path: Path, settings: dict, row_count: int, chunk_rows: int) -> "PartialFile":
        """The partial file at ``path``, checked against this run's ``settings``; a chunk torn by an interrupt
        (its line unfinished) is cut off, to be scored again."""
        settings = normalised(settings)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise PartialFileError(f"--resume: there is no partial run to continue ({path} does not exist)") from None
        except IsADirectoryError:
            raise PartialFileError(f"--resume: {path} is not a regular file (a directory); it is left as it is") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PartialFileError(f"--resume: {path} is a symbolic link; it is not followed") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PartialFileError(f"--resume: {path} is not a regular file")
            _lock(fd, path)
            data = _read_all(fd)
            chunks, good_bytes = _parse(path, data, settings, row_count, chunk_rows)
            if good_bytes < len(data):  # an interrupted write: drop the torn line
                os.ftruncate(fd, good_bytes)
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, settings, chunks)

    @property
    def rows_done(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0

    def append(self, start: int, stop: int, columns: dict) -> None:
        """Write the values of rows ``[start, stop)`` and make them durable before returning."""
        if start != self.rows_done:
            raise ValueError(f"chunks are appended in order: expected rows from {self.rows_done}, got {start}")
        self._write({"rows": [start, stop], "columns": columns})
        self.chunks.append((start, stop, json.loads(json.dumps(columns))))

    def columns(self) -> dict:
        """``{name: [values of every row written]}``, in row order."""
        out: dict = {}
        for _, _, columns in self.chunks:
            for name, values in columns.items():
                out.setdefault(name, []).extend(values)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Remove the file, then let go of it (and of its lock): a run waiting on it never reads a removed file."""
        self.path.unlink(missing_ok=True)
        self.close()

    def _write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)


def _read_all(fd: int) -> bytes:
    parts = []
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _parse(path: Path, data: bytes, settings: dict, row_count: int, chunk_rows: int):
    """``(chunks, bytes of complete lines)`` of a partial file's content; PartialFileError when it is not
    this command's or was written with other settings."""
    end = data.rfind(b"\n") + 1  # after the last complete line; a torn last line has no newline
    lines = data[:end].split(b"\n")[:-1]
    header = None
    if lines:
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
    if not isinstance(header, dict) or header.get(MAGIC) != VERSION or not isinstance(header.get("settings"), dict):
        raise PartialFileError(
            f"--resume: {path} is not a partial file of align-losses logps (its first line is not the header "
            f"this command writes); it is left as it is: remove it or choose another --out"
        )
    differ = [
        f"{key} {header['settings'].get(key)!r} there, {value!r} now"
        for key, value in settings.items() if header["settings"].get(key) != value
    ]
    if differ:
        raise PartialFileError(
            f"--resume: the partial run in {path} was made with other settings or inputs ({'; '.join(differ)}); "
            f"rerun with the arguments and files of that run, or remove {path} to start again"
        )
    chunks, start = [], 0
    for number, line in enumerate(lines[1:], 2):
        try:
            record = json.loads(line)
            lo, hi = record["rows"]
            columns = record["columns"]
            if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
                raise TypeError("columns must map names to lists of values")
        except (ValueError, KeyError, TypeError):
            raise PartialFileError(f"--resume: {path} line {number} is damaged; remove {path} to start again") from None
        if (lo, hi) != (start, min(start + chunk_rows, row_count)) or any(len(v) != hi - lo for v in columns.values()):
            raise PartialFileError(
                f"--resume: {path} line {number} holds rows [{lo}, {hi}), expected [{start}, "
                f"{min(start + chunk_rows, row_count)}); remove {path} to start again"
            )
        chunks.append((lo, hi, columns))
        start = hi
    return chunks, end


def write_output(path: str, write: Callable[[object], None], binary: bool) -> None:
    """Write ``path`` atomically: ``write(file)`` fills a temporary file created exclusively with a unique name
    in ``path``'s folder, which then replaces ``path`` (a link at ``path`` is replaced, not followed). The
    temporary file is removed on any failure or interrupt."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=output_folder(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def output_folder(path: str) -> Path:
    """The folder ``path`` is written in: its parent, resolved, not the folder of a link's target (a link at
    ``path`` is replaced, so its target's folder is never written)."""
    return Path(path).parent.resolve()


def folder_fingerprint(path: Optional[str], exclude=()) -> Optional[dict]:
    """What identifies a model or tokenizer folder's content cheaply: ``{file name: [size, mtime_ns]}`` of the
    files in it (None for None), leaving out the paths in ``exclude`` (the command's own files, should they
    be written there) and hidden files."""
    if path is None:
        return None
    skip = {Path(p).resolve() for p in exclude}
    out = {}
    for p in sorted(Path(path).iterdir()):
        if p.name.startswith(".") or p.resolve() in skip or not p.is_file():
            continue
        info = p.stat()
        out[p.name] = [info.st_size, info.st_mtime_ns]
    return out


def normalised(settings: dict) -> dict:
    """``settings`` as the partial file's header stores them (tuples become lists), for comparison."""
    return json.loads(json.dumps(settings))
