"""Model calls in flight, and changes of the patches or settings: a change waits for the calls in
flight to end, and new calls wait for the change, so that no call runs half patched or with
settings changed under it (under jit, a call is its tracing)."""

import contextlib
import inspect
import sys
import threading

from openpi_prune.errors import PruneError


class InFlight:
    """Reentrant: a call's nested calls and a change's nested changes go straight through."""

    def __init__(self):
        self._cond = threading.Condition()
        self._calls = 0
        self._changer: int | None = None  # the thread changing things now
        self._depth = threading.local()

    @contextlib.contextmanager
    def call(self):
        """Yields True in the outermost call of this thread."""
        depth = getattr(self._depth, "calls", 0)
        outermost = depth == 0 and self._changer != threading.get_ident()
        if outermost:
            with self._cond:
                self._cond.wait_for(lambda: self._changer is None)
                self._calls += 1
        self._depth.calls = depth + 1
        try:
            yield outermost
        finally:
            self._depth.calls = depth
            if outermost:
                with self._cond:
                    self._calls -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def change(self):
        me = threading.get_ident()
        if self._changer == me:
            yield
            return
        if getattr(self._depth, "calls", 0):
            raise PruneError(
                "openpi-prune cannot be enabled, disabled or re-configured from inside a model call "
                "(a hook or plugin tried to): it would wait for that call to end. Do it between calls."
            )
        with self._cond:
            self._cond.wait_for(lambda: self._changer is None)
            self._changer = me
            self._cond.wait_for(lambda: self._calls == 0)
        try:
            yield
        finally:
            with self._cond:
                self._changer = None
                self._cond.notify_all()


IN_FLIGHT = InFlight()


def inside_unpatched(entry_points) -> bool:
    """Whether this thread is inside one of OpenPI's `entry_points` (patches) entered without our
    wrapper (looked up before `enable()`): its inner calls must not be pruned halfway."""
    codes = {inspect.unwrap(p.original()).__code__ for p in entry_points if p.module in sys.modules}
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False
