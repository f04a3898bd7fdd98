"""The console entry point. Ctrl-C while it imports the CLI (and so torch) ends with one line and exit
130, like Ctrl-C at any later point, not a traceback.

A KeyboardInterrupt raised inside a half-run import can leave a package half-initialised (numpy then
recurses until RecursionError as the next import touches it), so during the imports SIGINT does not
raise: it ends the process at once. Nothing has run yet, so nothing is lost.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import List, Optional

from .errors import EXIT_INTERRUPTED


def _interrupted_while_importing(signum, frame) -> None:
    sys.stderr.write("gradscope: interrupted\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def main(argv: Optional[List[str]] = None) -> int:
    # Only the main thread may set a handler; a process started with SIGINT ignored (under nohup, or in
    # the background of a script) keeps ignoring it, as Unix programs do.
    owned = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    previous = signal.signal(signal.SIGINT, _interrupted_while_importing) if owned else None
    try:
        from .cli import main as run
    finally:
        if owned:
            signal.signal(signal.SIGINT, previous)
    code = run(argv)
    from .collect import distributed
    if distributed.left_group:  # see distributed.left_group: skip the shutdown that can abort a clean run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
