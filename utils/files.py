"""Hand-off files between the steps: atomic writes, checked reads, the settings stamp that keeps an
output from being replaced by one made with other settings, and the lock of a run folder.

Every reader turns a missing, truncated or foreign file into a one-line UserError naming the file;
every writer writes to a temporary name and renames, so a killed step never leaves half a file.
"""
import contextlib
import fcntl
import json
import os
from pathlib import Path

import numpy as np

from utils.errors import UserError


# ----------------------------------------------------------------------------------- writing
def atomic_write(path, write):
    """``write(tmp_path)`` then rename onto ``path``: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def save_txt(path, values):
    atomic_write(path, lambda tmp: np.savetxt(tmp, values))


def save_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


# ----------------------------------------------------------------------------------- reading
def read_npy(path, what="file"):
    """np.load(allow_pickle=False) of a hand-off array; UserError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or pickled: the user's file problem
        raise UserError(f"{what} {path} cannot be read ({err.__class__.__name__}: truncated or not a "
                        "plain .npy); make it again with the step that wrote it") from None


def read_json(path, what="file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{what} {path} cannot be read ({err.__class__.__name__}: truncated or not JSON); "
                        "make it again with the step that wrote it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} does not hold a JSON object")
    return obj


def read_txt_values(path, what="file"):
    """One float per line (the FCT text files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return np.loadtxt(path, ndmin=1)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {path} cannot be read ({err.__class__.__name__}); "
                        "make it again with the step that wrote it") from None


# ----------------------------------------------------------------------------------- settings stamps
def refuse_other_settings(stamp_path, settings, overwrite, what, guarded=()):
    """The one rule for replacing an output: an output is replaced only by one made with the same
    ``settings`` (a dict), unless --overwrite. ``stamp_path`` is the JSON that records the settings
    of the output now there; ``guarded`` are the output files it describes (an output without a
    stamp, or a stamp that cannot be read, counts as made with other settings).
    Call before any work; write the new stamp with ``save_json`` before the outputs."""
    if overwrite:
        return
    stamp_path = Path(stamp_path)
    if not stamp_path.exists():
        present = [p for p in map(Path, guarded) if p.exists()]
        if present:
            raise UserError(f"{present[0]} exists and does not say how it was made; pass --overwrite to replace it")
        return
    try:
        old = json.loads(stamp_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{stamp_path} cannot be read; pass --overwrite to replace {what}") from None
    for key, value in settings.items():
        if old.get(key) != value:
            raise UserError(f"{what} was made with {key}={old.get(key)} (this run: {key}={value}); pass "
                            "--overwrite to replace it, or keep it by using another --save_root")


# ----------------------------------------------------------------------------------- locks
_HELD = {}


def lock_folder(folder, name=".lock"):
    """Hold an exclusive lock on ``folder`` (created if needed) until unlock_folder or the process ends.

    A second process asking for the same folder gets a one-line UserError naming the first. The
    lock is an flock on ``folder/name``: the kernel drops it when its process ends, however it
    ends, so a killed run never leaves it stuck. Returns the lock file's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / name).resolve()
    if path in _HELD:  # the same process again (a step calling another): count it
        _HELD[path][1] += 1
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{folder} is in use by process {holder}; wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = [fd, 1]
    return path


@contextlib.contextmanager
def folder_lock(folder, name=".lock"):
    """lock_folder for the duration of a ``with`` block."""
    lock_folder(folder, name)
    try:
        yield
    finally:
        unlock_folder(folder, name)


def unlock_folder(folder, name=".lock"):
    """Release what lock_folder took (the file stays; it is free once no process holds it)."""
    path = (Path(folder) / name).resolve()
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        os.close(_HELD.pop(path)[0])
