"""The trial's plan: the variants (settings), the schedules, the families and the fingerprint a
run must share to be summarised with others."""

import dataclasses
import hashlib
import pathlib

import numpy as np

import openpi_prune
from openpi_prune.tools.lab import named, scenes, train

REFERENCE = "reference (unpruned)"
DEFAULT = "default (relevance)"  # the shipped rule: other variants are also paired with it
# The training rule the default had before the cheaper one (the saliency on every step, full length
# throughout), pinned for the variants whose committed runs were made with it.
FULL_COST = dict(compact_training=False, saliency_every=1)
# The head the default had before its hidden layer, pinned likewise (and the control of the one now).
BILINEAR = dict(relevance_hidden=0)
# name -> settings changes (compact mode, the shipped default, unless a variant says otherwise).
VARIANTS = {
    REFERENCE: dict(method="keep_all", scoring="lightvla"),
    # The compact prefix after the ramp, the saliency every 4th step.
    DEFAULT: dict(method="relevance"),
    "relevance, the bilinear head (relevance_hidden=0)": dict(method="relevance", **BILINEAR),
    "relevance, saliency every step": dict(method="relevance", **BILINEAR, **FULL_COST),
    # The default's cost with the head updated on every step: the saliency of a quarter of each batch.
    "relevance, saliency of a quarter of each batch": dict(
        method="relevance", saliency_every=1, saliency_share=0.25, **BILINEAR
    ),
    # A control: the default's whole training path (head, saliency, compact pass) keeping every patch.
    # Near 1 if what the pruned variants lose is the pruning itself, not something the path adds.
    "relevance, every patch kept (control)": dict(method="relevance", **BILINEAR, keep_fraction=1.0),
    # The default plus one token per camera, the mean of the patches it does not keep; or four, the
    # means of the unkept patches of each quarter of the image.
    "relevance, unkept patches merged": dict(method="relevance", **BILINEAR, merge_unkept=1),
    "relevance, unkept patches merged by quarter": dict(method="relevance", **BILINEAR, merge_unkept=4),
    # Controls for the count: as many tokens as the quarter merge without merging (17 a camera), and
    # the quarter merge with as many as the default (9 patches and 4 merged tokens).
    "relevance, 27 % kept (17 a camera)": dict(method="relevance", **BILINEAR, keep_fraction=0.265),
    "relevance, 14 % kept, merged by quarter (13 a camera)": dict(
        method="relevance", keep_fraction=0.14, merge_unkept=4, **BILINEAR
    ),
    # Meta-World's closest to its reference: 24 % and a mean per quarter, as many tokens (20 a camera)
    # as keeping 30 %, which runs beside it.
    "relevance, 30 % kept (20 a camera)": dict(method="relevance", **BILINEAR, keep_fraction=0.3),
    "relevance, 24 % kept, merged by quarter (20 a camera)": dict(
        method="relevance", keep_fraction=0.24, merge_unkept=4, **BILINEAR
    ),
    # Pruned before SigLIP's (one) layer: it runs on each camera's kept patches alone, as the
    # full-size bench's cheapest row does; what does that cost against pruning after it?
    "relevance, pruned before SigLIP (siglip_layer=0)": dict(method="relevance", **BILINEAR, siglip_layer=0),
    # A hidden layer in the head (each patch beside its scene's mean): on Meta-World 4-9 points more
    # scenes than the default at the same 20 %; does it hold on the trials?
    "relevance, a hidden layer of 256 in the head": dict(method="relevance", relevance_hidden=256),
    "distinct (prompt-blind)": dict(method="distinct", **FULL_COST),
    "random share": dict(method="random", **FULL_COST),
    "verbatim LightVLA": dict(method="language_only", scoring="lightvla", **FULL_COST),
    # The kept count follows the scene (the head's softmax mass), at most 30 % of the live patches;
    # after fine-tuning, keep_mass is set on the validation split to keep the default's share.
    "adaptive budget (relevance)": dict(method="relevance", **BILINEAR, keep_mass=0.8, keep_fraction=0.3, **FULL_COST),
}
BOOTSTRAP = 2000
EXAMPLES = 4  # test scenes whose kept patches each run keeps, for the picture


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    baseline: train.Schedule = train.Schedule(steps=2000, lr=1e-3, single_object=0.25)
    finetune: train.Schedule = train.Schedule(
        steps=600, lr=3e-4, batch_size=16, warmup=15, seed=100_000, keep_ramp=0.25
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    validation: int = 256
    test: int = 1024
    noise_draws: int = 3
    spec: scenes.SceneSpec | named.NamedSpec = scenes.SceneSpec()

    def finetune_for(self, seed: int) -> train.Schedule:
        """Seed `seed`'s fine-tuning: its own batches (and, through them, its own noise)."""
        return dataclasses.replace(self.finetune, seed=self.finetune.seed + 10_000 * seed)


QUICK = TrialPlan(
    baseline=train.Schedule(steps=3, lr=1e-3, batch_size=4, single_object=0.34, warmup=1),
    finetune=train.Schedule(steps=2, lr=3e-4, batch_size=4, warmup=1, seed=100_000, keep_ramp=0.25),
    seeds=(0, 1),
    validation=8,
    test=12,
    noise_draws=2,
)
FAMILIES = {"blocks": scenes.SceneSpec(), "named": named.NamedSpec()}
SWAP_SEED = 3_000_000


def settings_for(changes: dict) -> openpi_prune.PruneSettings:
    # Telemetry is collected inside the jitted functions; no host callback needed.
    return openpi_prune.PruneSettings(telemetry=False, warn_below=0, **changes)


def fingerprint(plan: TrialPlan, val: scenes.Batch, test: scenes.Batch, training: set, baseline: bool = False) -> str:
    """A hash of what a run's figures rest on besides its code: the plan (but which seeds this piece
    runs), the held-out scenes and every training layout. A piece resumes only runs that share it.
    `baseline`: what the baseline rests on, its plan without the fine-tuning, so trials that differ
    only in their fine-tuning share one baseline."""
    covered = dataclasses.replace(plan, seeds=(), **({"finetune": None} if baseline else {}))
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(covered).encode())
    for batch in (val, test):
        digest.update(repr(batch.layouts).encode())
        for array in (batch.actions, batch.tokens, *batch.images.values()):
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(repr(sorted(training)).encode())
    return digest.hexdigest()


def check_same(path: pathlib.Path, found: str | None, expected: str) -> None:
    if found != expected:
        raise SystemExit(
            f"{path} was made for another plan or other scenes (fingerprint {found}, this run's {expected}): "
            "its figures cannot be paired with this run's. Choose another --out, or move it away."
        )
