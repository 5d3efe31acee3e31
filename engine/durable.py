"""Writing files and folders so that a crash, a kill or a full disk never leaves half of one.

A file is written to a temporary name, synced, and renamed over the real one; a folder likewise,
and an existing folder is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` so
that some complete version always stands under the real name. Run folders are made with an
exclusive ``mkdir``, so two runs started at once never share one. :func:`describe` turns whatever
a failed write raised (``OSError``, torch's ``RuntimeError``, safetensors' ``SafetensorError``)
into one line naming the cause, e.g. "no space left on device: 1.2 MB free on /data".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

from tunedeck.engine.errors import ConfigError

# What to say when a folder cannot be written; the run itself goes on.
WRITE_ADVICE = "free disk space or point train.output_dir at another disk; earlier checkpoints are untouched"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a create or a rename inside it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Sync every file of ``folder`` and the folders that hold them (before it is renamed into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # a file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(b))


def install_dir(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` (synced) at ``folder``, replacing any folder there.

    A new name is one rename. An existing folder is swapped with ``tmp`` in one step and the old
    one, now at ``tmp``, removed; so a crash at any moment leaves a complete folder under the real
    name. Where the file system cannot swap, the old folder is first renamed aside
    (``.old-<name>``): a crash between the two renames leaves it complete beside the real name, and
    :func:`recover_dir` puts it back.
    """
    fsync_tree(tmp)
    parent = folder.parent
    if not folder.exists():
        tmp.rename(folder)
    elif _exchange(tmp, folder):
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = parent / f".old-{folder.name}"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


def recover_dir(folder: Path) -> None:
    """Undo a crash between the two renames of :func:`install_dir`'s fallback."""
    old = folder.parent / f".old-{folder.name}"
    if not folder.exists() and old.is_dir():
        old.rename(folder)


def make_run_dir(root: Path, name: str) -> Path:
    """Create ``root/name`` (or ``name-2``, ``name-3`` ... when taken) with an exclusive mkdir."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"could not create train.output_dir {root}: {describe(e, root)}", WRITE_ADVICE
        ) from None
    n = 1
    while True:
        run_dir = root / (name if n == 1 else f"{name}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            n += 1
            continue
        except OSError as e:
            raise ConfigError(
                f"could not create the run folder {run_dir}: {describe(e, root)}", WRITE_ADVICE
            ) from None
        fsync_dir(root)
        return run_dir


# ---------------------------------------------------------------- free space and causes


class WriteFailed(Exception):
    """A write that failed, with its cause found at that moment (see :func:`describe`): before
    the half-written files are removed, while a full disk is still full."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that is an existing folder (the one a file is written in)."""
    p = Path(path).absolute()
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def human(n: float) -> str:
    """Bytes as people read them: 512 B, 1.2 MB, 3.4 GB (powers of 1000, as df -H)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path`` (the disk that is full)."""
    p = existing_parent(path)
    try:
        dev = p.stat().st_dev
        while p != p.parent and p.parent.stat().st_dev == dev:
            p = p.parent
    except OSError:
        pass
    return p


def no_space(path: Path) -> str:
    free = free_bytes(path)
    where = mount_point(path)
    return (
        f"no space left on device: {human(free)} free on {where}"
        if free is not None
        else (f"no space left on device at {where}")
    )


_OS_ERROR = re.compile(r"os error (\d+)")


def describe(e: BaseException, path: Path) -> str:
    """The cause of a failed write to ``path`` in one line."""
    code = e.errno if isinstance(e, OSError) else None
    text = str(e)
    if code is None:
        # safetensors reports the OS error inside its text; torch.save says only "file write failed".
        m = _OS_ERROR.search(text)
        if m:
            code = int(m.group(1))
        elif "No space left" in text:
            code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        return no_space(path)
    if code == errno.EROFS:
        return f"read-only file system at {existing_parent(path)}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied at {getattr(e, 'filename', None) or path}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename or path}"
    free = free_bytes(path)
    if free is not None and free < 1_000_000:  # torch.save's "unexpected pos" on a full disk
        return no_space(path)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def cause(e: BaseException, path: Path) -> str:
    """The cause of a failed write: the one found when it failed, or else :func:`describe`'s now."""
    return e.cause if isinstance(e, WriteFailed) else describe(e, path)


def low_space(path: Path, needed: int) -> str | None:
    """A warning when the disk holding ``path`` has less than twice ``needed`` bytes free, else None."""
    free = free_bytes(path)
    if free is None or free >= 2 * needed:
        return None
    return (
        f"low disk space: {human(free)} free on {existing_parent(path)}, and a checkpoint takes about "
        f"{human(needed)}"
    )


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += (Path(root) / name).stat().st_size
    return total
