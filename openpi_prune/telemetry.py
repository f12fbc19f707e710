"""What the pruner kept and why, per sample and per camera, to tell collapse from health.

Inside a traced function, `collect()` hands training code the numbers as JAX arrays (log them
from the train step). On the host, every pruned prefix is reported to the `openpi_prune_report`
hook as a `Telemetry` of numpy arrays; the built-in recorder keeps the latest ones (`recent()`)
and warns when the kept count collapses. A prefix reaches the host by a host callback, or, in a
served call (`returned()`), as an output of the compiled call, read after its actions.
"""

import atexit
import collections
import contextlib
import contextvars
import dataclasses
import logging
import threading
import warnings

import numpy as np

from openpi_prune.errors import CollapseWarning, NonFiniteInputWarning
from openpi_prune.hookspecs import hookimpl

logger = logging.getLogger("openpi_prune")


@dataclasses.dataclass(frozen=True)
class Telemetry:
    """One pruned prefix. `values` (also readable as attributes) holds, per sample, shape [b]
    unless noted:

    kept              image tokens kept (after capacity)
    kept_per_camera   [b, cameras]
    candidates        live image tokens that could be kept (cameras not masked)
    union_picks       distinct argmax picks (LightVLA's kept set, before capacity)
    top1_vote_share   votes of the most-voted patch / voters
    query_spread      spread of the normalised queries (0: all rows ask the same)
    patch_spread      spread of the normalised patches
    task_spread       spread of the normalised live task tokens
    score_gap         mean over voters of top-1 minus top-2 score
    live_task_tokens  task tokens the patches attended to
    overflow          kept tokens dropped because the capacity was full
    kept_mask         [b, n] which image tokens were kept
    merged_mask       [b, n] which of them hold the mean of a region's unkept patches (`merge_unkept`
                      only; the others are patches kept as they are)
    prefix_length     positions of the prefix PaliGemma runs (compact: image slots + prompt)
    distill_loss      the pruner's own loss (training passes of methods that learn from saliency;
                      0 on a step without saliency, see `saliency_every`)
    training_step     the model's training step (training passes of a model that counts them)
    nonfinite         live image tokens with a NaN or inf, never kept
    For a method that scores each patch (`relevance`) rather than voting, union_picks is the kept
    count, top1_vote_share the top patch's softmax share, score_gap the gap between the best two.
    """

    method: str
    mode: str  # "compact", "masked" or "train"
    capacity: int
    warn_below: int
    values: dict[str, np.ndarray]
    log_every: int = 0  # the settings' `log_every`, for the training log

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def summary(self) -> dict[str, float]:
        """Batch means of the per-sample numbers."""
        masks = ("kept_mask", "merged_mask", "kept_per_camera")
        return {k: float(np.mean(v)) for k, v in self.values.items() if k not in masks}

    @property
    def collapsed(self) -> bool:
        return bool(np.mean(self.values["kept"]) < self.warn_below)


_collectors: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("openpi_prune_collectors", default=())


@contextlib.contextmanager
def collect():
    """Collect the telemetry arrays of every prefix pruned inside the block (traced or not).

    >>> with openpi_prune.telemetry.collect() as reports:
    ...     loss = model.compute_loss(rng, obs, actions, train=True)
    >>> reports[0]["kept"]   # a JAX array: return it from the train step to log it
    """
    reports: list[dict] = []
    token = _collectors.set((*_collectors.get(), reports))
    try:
        yield reports
    finally:
        _collectors.reset(token)


@contextlib.contextmanager
def isolated():
    """Inside a traced branch (`lax.cond`), whose values can leave it only as its outputs: the block's
    reports go to the list it yields, not to the blocks around it (and only if one collects)."""
    reports: list[dict] = []
    token = _collectors.set((reports,) if _collectors.get() else ())
    try:
        yield reports
    finally:
        _collectors.reset(token)


_returned: contextvars.ContextVar[list | None] = contextvars.ContextVar("openpi_prune_returned", default=None)


@contextlib.contextmanager
def returned():
    """Around the trace of a served call (`Pi0.sample_actions` under `Policy.infer`): each pruned
    prefix's `(description, values)` goes to the list it yields, for the call to return with its
    actions, instead of by host callback, which would hold up the call until the host has them."""
    reports: list[tuple[dict, dict]] = []
    token = _returned.set(reports)
    try:
        yield reports
    finally:
        _returned.reset(token)


def deliver_returned(description: dict, values: dict) -> bool:
    """Hand a prefix's telemetry to the `returned()` block around this trace; False if none is open."""
    reports = _returned.get()
    if reports is None:
        return False
    reports.append((description, values))
    return True


def collecting() -> bool:
    """Whether a `collect()` block is open around the current call."""
    return bool(_collectors.get())


def deliver_traced(values: dict) -> None:
    for reports in _collectors.get():
        reports.append(values)


class Recorder:
    """Built-in `openpi_prune_report` plugin: keeps the latest reports and warns of collapse."""

    def __init__(self, size: int = 64):
        self._lock = threading.Lock()
        self._reports: collections.deque[Telemetry] = collections.deque(maxlen=size)

    @hookimpl(trylast=True)
    def openpi_prune_report(self, telemetry: Telemetry):
        with self._lock:
            self._reports.append(telemetry)
        nonfinite = int(np.sum(telemetry.values.get("nonfinite", 0)))
        if nonfinite:
            warnings.warn(
                f"openpi-prune ({telemetry.method}): {nonfinite} live image token(s) held NaN or inf and "
                "were dropped like a masked camera's; check the images (NaN or inf pixels).",
                NonFiniteInputWarning,
                stacklevel=2,
            )
        if telemetry.collapsed:
            warnings.warn(
                f"openpi-prune ({telemetry.method}, {telemetry.mode}) kept "
                f"{np.mean(telemetry.values['kept']):.1f} image tokens on average, below warn_below="
                f"{telemetry.warn_below}: the vote has collapsed (top-1 vote share "
                f"{np.mean(telemetry.values['top1_vote_share']):.2f}, query spread "
                f"{np.mean(telemetry.values['query_spread']):.3f}).",
                CollapseWarning,
                stacklevel=2,
            )

    def recent(self) -> list[Telemetry]:
        with self._lock:
            return list(self._reports)

    def clear(self) -> None:
        with self._lock:
            self._reports.clear()


RECORDER = Recorder()


class TrainingLog:
    """Built-in `openpi_prune_report` plugin: the pruner's line in a training log. Every `log_every`
    training steps it logs (Python's `logging`, which OpenPI's `scripts/train.py` prints) the kept
    patches per camera and the head's loss, averaged over those steps."""

    def __init__(self):
        self._kept: list[np.ndarray] = []
        self._losses: list[float] = []

    @hookimpl
    def openpi_prune_report(self, telemetry: Telemetry):
        step = telemetry.values.get("training_step")
        if telemetry.mode != "train" or not telemetry.log_every or step is None:
            return
        self._kept.append(np.mean(telemetry.values["kept_per_camera"], axis=0))
        if "distill_loss" in telemetry.values:
            self._losses.append(float(np.mean(telemetry.values["distill_loss"])))
        step = int(np.max(step))
        if (step + 1) % telemetry.log_every:
            return
        kept = np.mean(self._kept, axis=0)
        live = np.mean(telemetry.values["candidates"])
        head = f", head's loss {np.mean(self._losses):.4f}" if self._losses else ""
        logger.info(
            "openpi-prune at training step %d: kept per camera %s (%.0f %% of the live patches)%s; means over %d step(s)",
            step,
            np.round(kept, 1).tolist(),
            100 * kept.sum() / max(live, 1),
            head,
            len(self._kept),
        )
        self._kept.clear()
        self._losses.clear()


TRAINING_LOG = TrainingLog()


def recent() -> list[Telemetry]:
    """The latest host-side reports, oldest first (call `jax.effects_barrier()` first after jit)."""
    return RECORDER.recent()


def clear() -> None:
    RECORDER.clear()


class Delivery:
    """Hands each report to the plugins' report hooks on one worker thread, in order: a slow or
    blocked hook never holds up the model call that made the report, and one that raises is logged
    and skipped. At most `size` reports wait; past that, new ones are dropped (and counted)."""

    def __init__(self, size: int = 256):
        self._size = size
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._busy = False
        self._worker: threading.Thread | None = None
        self.dropped = 0

    def put(self, hooks: list, report: Telemetry) -> None:
        with self._cond:
            if len(self._queue) >= self._size:
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning(
                        "openpi-prune: %d telemetry reports wait for a report hook that does not keep up; "
                        "dropping new ones (counted in telemetry.DELIVERY.dropped)",
                        self._size,
                    )
                return
            self._queue.append((hooks, report))
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="openpi-prune-telemetry", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue)
                hooks, report = self._queue.popleft()
                self._busy = True
            for hook in hooks:
                try:
                    hook.function(telemetry=report)
                except Exception:
                    logger.exception(
                        "openpi-prune: the openpi_prune_report hook of %r raised; skipped", hook.plugin_name
                    )
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every report so far reached the hooks; False if `timeout` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)


DELIVERY = Delivery()
# Reports made just before exit still reach the hooks (a blocked one delays exit by 5 s at most).
atexit.register(DELIVERY.flush, 5.0)


def flush(timeout: float | None = None) -> bool:
    """Wait until the plugins' report hooks have every report so far (the built-in recorder has
    them at once); False if `timeout` ran out first."""
    return DELIVERY.flush(timeout)
