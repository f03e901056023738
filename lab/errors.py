"""One exception type for every mistake a user can fix, and one line for everything else.

Code that knows what went wrong raises a LabError whose message names the offending thing and the
fix. Whatever escapes anyway (a full disk, a file that is not UTF-8, a refused Docker call, a bug)
is turned into one line by `explain` at the CLI's edge, so a user never meets a traceback;
LAB_DEBUG=1 prints the traceback as well.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class LabError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


def debug() -> bool:
    return os.environ.get("LAB_DEBUG", "") not in ("", "0", "false", "no")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def explain(e: BaseException) -> tuple[str, int]:
    """(one line, exit status) for an exception that reached the CLI: 2 for what the user can fix,
    70 (EX_SOFTWARE) for what looks like a bug in the lab. The line names the log a failed run
    left (`e.lab_log`, set by lab.runs.keep_failed_logs) unless it already does."""
    line, status = _explain(e)
    log = getattr(e, "lab_log", None)
    if log is not None and str(log) not in line and str(Path(log).parent) not in line:
        line += f"; log: {log}"
    return line, status


def _explain(e: BaseException) -> tuple[str, int]:
    if isinstance(e, LabError):
        return str(e), 2
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
            return f"{where}no space left on the device; free some (earlier checkpoints and results are kept)", 2
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"{where}permission denied; check who owns it (`ls -ld`), or choose another path", 2
        if e.errno == errno.EROFS:
            return f"{where}read-only file system; point the lab at a writable directory", 2
        if e.errno is not None and e.strerror:
            return f"{where}{e.strerror}", 2
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({_first_line(e)}); save it as UTF-8", 2
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch or max_length", 2
    kind = type(e).__name__
    if kind == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return (f"the GPU ran out of memory ({_first_line(e)}); lower train.per_device_train_batch_size or "
                "train.max_length, or use gradient_checkpointing"), 2
    if isinstance(e, TimeoutError):
        return f"timed out ({_first_line(e)}); is the server or the Docker engine overloaded?", 2
    module = type(e).__module__.split(".")[0]
    # the Docker SDK speaks to the engine through requests; docker.errors.APIError and friends: the engine said no
    if module in ("docker", "requests"):
        detail = getattr(e, "explanation", None) or _first_line(e)
        return f"the Docker engine refused: {str(detail).strip().splitlines()[0][:300]}", 2
    if module in ("httpx", "openai"):
        return f"the server did not answer as expected ({kind}: {_first_line(e)})", 2
    return f"unexpected {kind}: {_first_line(e)} (a bug in the lab; LAB_DEBUG=1 shows the traceback)", 70
