"""Where a report goes: every destination is checked before training, and written atomically after it.

A run can take minutes; finding out only at the end that ``--output`` names a missing folder would lose
the report. So the CLI calls :func:`check` on every destination first (the report file, the baseline,
``$GITHUB_STEP_SUMMARY``), and :func:`write` replaces a file in one step (a temporary file beside it,
then ``os.replace``), so a reader never sees half a report and a failed write leaves the old file.
While a machine-readable document goes to stdout, :func:`user_stdout_to_stderr` sends whatever user code
prints to stderr instead, so the document still parses.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from . import interrupts
from .errors import GradscopeError

PathLike = Union[str, Path]


def check(path: PathLike, what: str, *, append: bool = False) -> None:
    """Raise a GradscopeError now if ``path`` cannot be written (or appended to) later."""
    path = Path(path)
    hint = f"point {what} at a file in a folder you can write to"
    if path.is_dir():
        raise GradscopeError(f"{what} {path} is a folder, not a file", f"name a file, e.g. {path / 'report.out'}")
    folder = path.parent
    if not folder.is_dir():
        raise GradscopeError(f"{what} {path}: the folder {folder} does not exist", f"create it first (mkdir -p "
                                                                                  f"{folder}), or {hint}")
    if append and path.exists():
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise GradscopeError(f"{what} {path} cannot be appended to: {exc.strerror}", hint) from None
        return
    try:  # a real probe: os.access says yes to root on a read-only file system
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise GradscopeError(f"{what} {path} cannot be written: {exc.strerror or exc}", hint) from None


def write(path: PathLike, text: str, what: str = "output") -> None:
    """Replace ``path`` with ``text`` atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    try:
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp", delete=False)
        try:
            with handle:
                handle.write(text)
            os.chmod(handle.name, _mode(path))  # a temporary file is private (0600); a report is not
            os.replace(handle.name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(handle.name)
            raise
    except OSError as exc:
        raise GradscopeError(f"could not write {what} {path}: {exc.strerror or exc}",
                             "check the disk and the folder's permissions") from None


def _mode(path: Path) -> int:
    """The mode the file keeps if it exists, else what a plain open() would give it under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def batch_path(output: PathLike, step: int) -> Path:
    """Where the batch of a spike at ``step`` is saved beside the report ``output``: r.json -> r.spike-12.pt."""
    output = Path(output)
    return output.with_name(f"{output.stem}.spike-{step}.pt")


def save_batches(spikes, output: PathLike) -> None:
    """Each spike's batch (``torch.save``), beside the report, so the step can be replayed: ``torch.load`` it
    and run the model on it. Written atomically, as the report is."""
    import torch

    for spike in spikes:
        if spike.batch is None:
            continue
        path = batch_path(output, spike.step)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            torch.save(spike.batch, temporary)
            os.replace(temporary, path)
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise GradscopeError(f"could not save the spike's batch to {path}: {exc}",
                                 "check the disk and the folder's permissions") from None


def write_reports(path: PathLike, reports: Sequence, verdicts: Sequence, fmt: Optional[str] = None,
                  what: str = "report") -> None:
    """The one report writer, for the CLI, the callbacks and the flight recorder: ``reports`` with their
    verdicts in the format ``fmt`` (else the one the path's suffix names, see ``formats.format_for``),
    several JSON reports as one list, written atomically (:func:`write`) and shielded from a second
    Ctrl-C or SIGTERM while it is written."""
    from .present.formats import FORMATS, format_for  # the display side loads when a report is written
    kind = fmt or format_for(str(path))
    texts = [FORMATS[kind](r, v) for r, v in zip(reports, verdicts)]
    if kind == "json" and len(texts) > 1:  # one document: a list of reports, one per optimizer and model
        texts = [json.dumps([json.loads(t) for t in texts], indent=2) + "\n"]
    with interrupts.shielded(sigterm=True):
        write(path, "".join(texts), what)


def append(path: PathLike, text: str, what: str) -> None:
    """Append in one write (a step summary is shared with other steps, so it cannot be replaced)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise GradscopeError(f"could not append to {what} {path}: {exc.strerror or exc}",
                             "check the disk and the file's permissions") from None


@contextlib.contextmanager
def user_stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """Send what user code prints, from Python or from native code, to stderr while active.

    Both layers are redirected: ``sys.stdout`` (Python's print) and file descriptor 1 (C extensions,
    subprocesses), where stdout is a real file descriptor.
    """
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no file descriptors (an embedded interpreter): Python-level redirection only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
