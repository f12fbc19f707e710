"""The `every_other` pruning method: keep patches 0, 2, 4, ... of those that could be kept.

Written as a third party would, against the hook specs only. Each report is recorded in `REPORTS`
and, when `EVERY_OTHER_LOG` names a file, appended to it as `method mode kept` (for a test to read
from outside the process).
"""

import os

import jax.numpy as jnp
import pluggy

hookimpl = pluggy.HookimplMarker("openpi_prune")

NAME = "every_other"
REPORTS = []


@hookimpl
def openpi_prune_methods():
    return [NAME]


@hookimpl
def openpi_prune_task_context(model, text_tokens, text_mask, noisy_actions, time, settings):
    if settings.method != NAME:
        return None
    return text_tokens, text_mask


@hookimpl
def openpi_prune_select(scores, candidate_mask, settings):
    if settings.method != NAME:
        return None
    n = candidate_mask.shape[-1]
    return candidate_mask & (jnp.arange(n) % 2 == 0)


@hookimpl
def openpi_prune_report(telemetry):
    if telemetry.method != NAME:
        return
    kept = [int(k) for k in telemetry.values["kept"]]
    REPORTS.append(kept)
    path = os.environ.get("EVERY_OTHER_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{telemetry.method} {telemetry.mode} {' '.join(map(str, kept))}\n")
