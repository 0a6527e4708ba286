"""Writing outputs: an output path is checked before any work, a file or folder is written under a
temporary name beside its destination and renamed into place when complete, and a write the
operating system refuses (disk full, a file-size limit, a read-only place) is one error line naming
the path and the reason, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from lwm_jax.errors import UserError

PARTIAL = ".partial"  # the end of every temporary name (`.NAME.PID.partial`) beside a destination
# How errors that wrap an OSError spell its code: tensorstore ([os_error_code='27']), Rust's io::Error
# of `tokenizers` ((os error 27)).
_OS_CODE = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)")


def os_reason(err: BaseException | None) -> str | None:
    """The operating system's reason for `err` or for an error it was raised from ("File too
    large"), or None when none of them came from the operating system. Libraries that wrap an
    OSError say it by its code or only by its text (array_record: "write() failed: File too large")."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        text = str(err)
        match = _OS_CODE.search(text)
        if match:
            return os.strerror(int(match.group(1) or match.group(2)))
        named = [os.strerror(code) for code in sorted(errno.errorcode) if os.strerror(code) in text]
        if named:
            return max(named, key=len)
        err = err.__cause__ or err.__context__
    return None


def write_error(path: str | Path, err: BaseException) -> UserError:
    """The one-line error of a failed write of `path`: `writing PATH failed: REASON`."""
    return UserError(f"writing {path} failed: {os_reason(err) or str(err).strip().splitlines()[0]}")


def _missing_parents(path: Path) -> list[Path]:
    """The folders of `path` (itself included) that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _make_folders(path: Path) -> list[Path]:
    """Makes `path` and its missing parents; returns the folders this call made, innermost first
    (not one another process made meanwhile)."""
    made = []
    for folder in reversed(_missing_parents(path)):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        made.insert(0, folder)
    return made


def _remove_folders(made: Sequence[Path]) -> None:
    """Removes the folders `_make_folders` made (innermost first) where they are still empty."""
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _why_unwritable(folder: Path) -> str | None:
    """Why no file can be made in `folder` (made for the test if missing, then removed again), or None."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    made: list[Path] = []
    try:
        made = _make_folders(folder)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lwm-jax-probe-", suffix=PARTIAL)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or str(err)
    finally:
        _remove_folders(made)
    return None


def check_output_dir(path: str | Path, what: str) -> Path:
    """The absolute path of the output folder `path`, once a file could be made in it; else a
    UserError naming `what` (e.g. "--out"), the path and the reason. Run before any work: a folder
    that had to be made for the check is removed again, so a command that fails later leaves none."""
    path = Path(path).expanduser().absolute()
    reason = _why_unwritable(path)
    if reason is not None:
        raise UserError(f"{what} {path} cannot be written: {reason}")
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """The absolute path of the output file `path`, refused if it is a folder or no file can be
    made in its folder (`check_output_dir`)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name such as {path / 'out'}")
    reason = _why_unwritable(path.parent)
    if reason is not None:
        raise UserError(f"{what} {path} cannot be written: {reason}")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(final: Path) -> None:
    """Removes what killed runs left beside `final`: temporary `.NAME.PID.partial` files and folders
    of processes that are gone."""
    for entry in final.parent.glob(f".{glob.escape(final.name)}.*{PARTIAL}"):
        pid = entry.name[len(final.name) + 2: -len(PARTIAL)]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def temporary_name(final: Path) -> Path:
    """The temporary name of `final` while this process writes it: `.NAME.PID.partial` beside it."""
    return final.parent / f".{final.name}.{os.getpid()}{PARTIAL}"


def _publish(stage: Path, final: Path, last: Sequence[str]) -> None:
    """Moves the entries of `stage` into `final` (over entries of the same name; those named in
    `last` are removed first and moved in last, so a marker file is the last thing to appear),
    or renames `stage` to `final` when there is nothing there."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        os.replace(stage, final)
        return
    for name in last:
        if (final / name).is_file():
            (final / name).unlink()
    for entry in sorted(stage.iterdir(), key=lambda e: e.name in last):
        target = final / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    stage.rmdir()


def write_failure(err: BaseException, stage: Path, final: Path) -> UserError | None:
    """The UserError of an error raised while writing into `stage` (the temporary name of `final`,
    or `final` itself), or None when it did not come from a write there (an input that could not be
    read, a bug)."""
    reason = os_reason(err)
    if reason is None:
        return None
    filename = getattr(err, "filename", None)
    if isinstance(err, OSError) and filename is not None:
        written = Path(os.fsdecode(filename)).absolute()
        if not written.is_relative_to(stage):
            return None
        return write_error(final / written.relative_to(stage), err)
    if not isinstance(err, OSError) and str(stage) not in str(err):
        return None
    return write_error(final, err)


def _destination(final: str | Path) -> Path:
    """The absolute destination; a symlink's target (renaming onto the link would replace the link,
    and its target may be on another file system than the link's folder)."""
    final = Path(final).expanduser().absolute()
    return final.resolve() if final.is_symlink() else final


def _prepare(final: Path) -> list[Path]:
    """Makes the folder of `final` (returns the folders made) and removes stale temporary names."""
    try:
        made = _make_folders(final.parent)
        remove_stale(final)
    except OSError as err:
        raise write_error(final, err) from None
    return made


@contextlib.contextmanager
def staged_folder(final: str | Path, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yields a new temporary folder beside the folder `final` to write an output into. When the
    block ends, its entries move into `final` (made if missing; `_publish`); when it fails, the
    temporary folder is removed with everything in it (and any parent folder made for it), and a
    write the operating system refused is one UserError naming the file and the reason."""
    final = _destination(final)
    stage = temporary_name(final)
    made = _prepare(final)
    try:
        stage.mkdir()
        yield stage
        _publish(stage, final, last)
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_folders(made)
        failed = write_failure(err, stage, final) if isinstance(err, Exception) else None
        if failed is not None:
            raise failed from err
        raise


@contextlib.contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """Yields the temporary name to write the file `final` under; it is renamed to `final` when the
    block ends, and removed when it fails (an OS refusal becomes one UserError naming `final`)."""
    final = _destination(final)
    temporary = temporary_name(final)
    made = _prepare(final)
    try:
        yield temporary
        os.replace(temporary, final)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        _remove_folders(made)
        failed = write_failure(err, temporary, final) if isinstance(err, Exception) else None
        if failed is not None:
            raise failed from err
        raise
