"""Ctrl-C under ``make serve``: the server's to answer, not make's."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def _under_make_at_a_terminal() -> int | None:
    """stdin's descriptor when make started this process in the terminal's foreground group."""
    try:
        fd = sys.stdin.fileno()
        ours = os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp() != os.getpid()
    except (OSError, ValueError):  # no stdin, or not a terminal
        return None
    return fd if ours and "MAKELEVEL" in os.environ else None


@contextmanager
def own_terminal() -> Iterator[None]:
    """At a terminal, Ctrl-C interrupts the whole foreground process group, make included, and make
    answers it by killing itself with SIGINT once its recipe has ended (the shell reports 130),
    whatever the recipe's exit code. So under make this process takes the terminal's foreground in a
    process group of its own, before it starts any child, and hands it back at the end: Ctrl-C reaches
    it and its children only, they stop in order, and make passes on the exit code (0). Ctrl-Z is
    ignored meanwhile, since make could not resume a group it does not know of. Elsewhere: nothing."""
    fd = _under_make_at_a_terminal()
    if fd is None:
        yield
        return
    make_group = os.getpgrp()
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTTOU, signal.SIGTSTP)}  # SIGTTOU: a
    try:  # background group may set the foreground only with it ignored
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
        yield
    finally:
        try:
            os.tcsetpgrp(fd, make_group)
        except OSError:  # the terminal is gone
            pass
        for s, handler in saved.items():
            signal.signal(s, handler)
