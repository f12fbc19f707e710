"""Pruning settings: one frozen dataclass, from code or from the `OPENPI_PRUNE` variable.

`OPENPI_PRUNE` is `1` for the defaults, or comma-separated `key=value` pairs naming fields of
`PruneSettings`, e.g. `OPENPI_PRUNE="method=language_only,mode=masked,capacity=96"`; a setting with
several values joins them by `+`: `drop_cameras=right_wrist_0_rgb`, `prompt_buckets=32+64` (`none`: empty).
This module imports nothing heavy: the start-up hook parses the variable with it.
"""

import dataclasses
import math
from typing import Literal

from openpi_prune.errors import SettingsError

ENV_VAR = "OPENPI_PRUNE"
Mode = Literal["compact", "masked"]
MODES = ("compact", "masked")
SCORINGS = ("lightvla", "centred", "robust")  # lightvla.prepare's choices
SALIENCIES = ("gradient", "deviation")  # relevance.saliency's choices
# Default inference budget: LightVLA keeps ~78 of 512 patches (15 %) on LIBERO; a quarter of each
# camera's 256 tokens leaves headroom over that before the most-voted rule has to drop any.
CAPACITY_PER_CAMERA = 64


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    # Which registered pruning method prunes (see `openpi-prune doctor`). relevance: a learned head,
    # distilled from the model's saliency, keeps the right patches in the lab; the LightVLA votes
    # (language_only, scheme_b, scheme_a, action_queries) do not.
    method: str = "relevance"
    # How patches and task tokens are prepared before the vote: lightvla (as they come), centred
    # (each sample's shared direction removed) or robust (per-dimension median / MAD, clipped).
    scoring: str = "robust"
    # compact: kept tokens are gathered into `capacity` slots, so the prefix is really shorter.
    # masked: same length, pruned tokens leave `input_mask` (numerically the same, no speed-up).
    mode: Mode = "compact"
    # Image-token slots of the compact prefix, for all cameras together; None: what the method can
    # keep (relevance: keep_fraction of them, keep_all: all), else 64 per camera.
    capacity: int | None = None
    # Cameras a config never uses (e.g. LIBERO's always-masked right wrist), left out before SigLIP
    # runs: their encoder pass and prefix slots are saved. A live camera dropped changes the actions.
    drop_cameras: tuple[str, ...] = ()
    # In compact mode, a served call (OpenPI's `Policy`) cuts the prompt's trailing padding to the
    # smallest of these lengths that holds its tokens (one compile per length); () keeps it whole.
    prompt_buckets: tuple[int, ...] = (32, 64, 128)
    # Give PaliGemma every kept token at the position it had unpruned (OpenPI numbers tokens by
    # cumsum(input_mask), which would renumber them); False: OpenPI's numbering of the pruned prefix.
    keep_positions: bool = True
    # Pruning inside SigLIP: score the patches after this many of its layers (So400m has 27) and run
    # the rest on the kept ones only, each camera keeping its own share; 0: SigLIP runs on the kept
    # patches alone; None: prune after SigLIP.
    # For methods that score each patch (relevance, random, distinct, keep_all).
    siglip_layer: int | None = None
    # Share of each sample's live patches the `relevance` method keeps (with keep_mass: at most).
    keep_fraction: float = 0.2
    # Width of a hidden layer in the `relevance` head: each patch, beside the mean of its sample's live
    # patches, passes through it (GELU) before the bilinear score against the prompt; 0: the bilinear
    # score on the patch itself (the default until 256 kept more of what the policy needs, on
    # Meta-World and the named trial). Its parameters are the model's, saved and loaded with it.
    relevance_hidden: int = 256
    # Adaptive budget (relevance): keep each sample's fewest most relevant patches that hold this
    # share of the head's softmax mass, at most keep_fraction of them; 0: always keep_fraction.
    keep_mass: float = 0.0
    # The unkept patches of each of this many equal squares of a camera's patch grid (1, 4, 16, ...)
    # averaged into one more token, in the place of the first of them: the pruned prefix keeps the
    # rest of the scene in outline (this many tokens per camera more). 0: the unkept are dropped.
    merge_unkept: int = 0
    # Which patches a `relevance` training pass keeps: those the head picks (what inference keeps),
    # or those the model's saliency picks (what the head learns to reproduce).
    train_picks: Literal["head", "saliency"] = "head"
    # What the head learns from: gradient, how strongly the unpruned loss responds to each patch (the
    # norm of its gradient); deviation, how much the loss would change, to first order, were the patch
    # the batch's mean patch at its place (|gradient . (patch - mean)|): a patch that looks the same in
    # every scene scores 0 however much the model attends to it.
    saliency: Literal["gradient", "deviation"] = "gradient"
    # Uniform noise added to the vote scores in training (LightVLA anneals it from 1 to 0).
    noise_scale: float = 1.0
    # Schedules counted in training steps by the model itself (it keeps its step with its parameters,
    # so OpenPI's own train step follows them and a resumed run goes on where it was); a block's own
    # `keep_fraction(...)` / `noise_scale(...)` wins. Gradual pruning: the kept share falls from every
    # patch to keep_fraction over this many steps (0: keep_fraction from the first step).
    keep_ramp_steps: int = 0
    # LightVLA's noise schedule: noise_scale at step 0, falling linearly to 0 at this step (0: constant).
    noise_steps: int = 0
    # The model's saliency (an unpruned forward and backward pass) on every k-th training step only;
    # the head learns on those steps and keeps what it learnt between them (1: every step, twice the
    # cost of upstream's step; a model that counts no steps gets it on every step).
    saliency_every: int = 4
    # The saliency of this share of each such step's batch only (its first samples): the head learns
    # from those. 0.25 on every step costs what the whole batch on every 4th step does, and gives
    # the head four times as many updates.
    saliency_share: float = 1.0
    # After the ramp, train on the compact prefix (the kept patches gathered, as inference runs it):
    # a pruned training pass shorter than upstream's, with the same loss and gradients. False: full
    # length throughout, the rest masked.
    compact_training: bool = True
    # Every this many training steps, a line in the training log (Python's logging, which OpenPI's
    # scripts/train.py prints): kept patches per camera and the head's loss; 0: none.
    log_every: int = 100
    # A telemetry report whose mean kept count is below this warns of collapse.
    warn_below: int = 8
    # Report telemetry to `openpi_prune_report` hooks (a served call returns it with its actions;
    # other calls by a host callback per prefix).
    telemetry: bool = True
    # Incompatible OpenPI: raise (True) or log and leave OpenPI untouched (False).
    strict: bool = True

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise SettingsError(f"method must be a non-empty string, got {self.method!r}")
        if self.scoring not in SCORINGS:
            raise SettingsError(f"scoring must be one of {', '.join(SCORINGS)}; got {self.scoring!r}")
        if self.mode not in MODES:
            raise SettingsError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.capacity is not None and (
            isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity <= 0
        ):
            raise SettingsError(
                f"capacity must be a positive number of image tokens (or unset for "
                f"{CAPACITY_PER_CAMERA} per camera); got {self.capacity!r}"
            )
        if (
            isinstance(self.keep_fraction, bool)
            or not isinstance(self.keep_fraction, int | float)
            or not (0 < self.keep_fraction <= 1)
        ):
            raise SettingsError(f"keep_fraction must be a number in (0, 1]; got {self.keep_fraction!r}")
        if (
            isinstance(self.keep_mass, bool)
            or not isinstance(self.keep_mass, int | float)
            or not (0 <= self.keep_mass <= 1)
        ):
            raise SettingsError(
                f"keep_mass must be a number in [0, 1] (0: a fixed keep_fraction); got {self.keep_mass!r}"
            )
        if not isinstance(self.drop_cameras, tuple) or not all(isinstance(c, str) and c for c in self.drop_cameras):
            raise SettingsError(
                f"drop_cameras must be a tuple of camera names, e.g. ('right_wrist_0_rgb',); got {self.drop_cameras!r}"
            )
        buckets = self.prompt_buckets
        if (
            not isinstance(buckets, tuple)
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets)
            or list(buckets) != sorted(set(buckets))
        ):
            raise SettingsError(
                f"prompt_buckets must be increasing positive prompt lengths, e.g. (32, 64, 128), or (); got {buckets!r}"
            )
        if self.train_picks not in ("head", "saliency"):
            raise SettingsError(f"train_picks must be head or saliency; got {self.train_picks!r}")
        if self.saliency not in SALIENCIES:
            raise SettingsError(f"saliency must be one of {', '.join(SALIENCIES)}; got {self.saliency!r}")
        if not isinstance(self.noise_scale, int | float) or self.noise_scale < 0:
            raise SettingsError(f"noise_scale must be a number >= 0; got {self.noise_scale!r}")
        if isinstance(self.warn_below, bool) or not isinstance(self.warn_below, int) or self.warn_below < 0:
            raise SettingsError(f"warn_below must be an integer >= 0; got {self.warn_below!r}")
        for name, lowest in (("keep_ramp_steps", 0), ("noise_steps", 0), ("saliency_every", 1), ("log_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise SettingsError(f"{name} must be an integer >= {lowest} (training steps); got {value!r}")
        if (
            isinstance(self.relevance_hidden, bool)
            or not isinstance(self.relevance_hidden, int)
            or self.relevance_hidden < 0
        ):
            raise SettingsError(
                f"relevance_hidden must be an integer >= 0 (the width of the head's hidden layer; 0: none); "
                f"got {self.relevance_hidden!r}"
            )
        if self.siglip_layer is not None and (
            isinstance(self.siglip_layer, bool) or not isinstance(self.siglip_layer, int) or self.siglip_layer < 0
        ):
            raise SettingsError(
                f"siglip_layer must be an integer >= 0 (SigLIP layers before the pruning; 0: before the first) or None; "
                f"got {self.siglip_layer!r}"
            )
        if (
            isinstance(self.saliency_share, bool)
            or not isinstance(self.saliency_share, int | float)
            or not (0 < self.saliency_share <= 1)
        ):
            raise SettingsError(
                f"saliency_share must be a share of the batch in (0, 1] (1: every sample); got {self.saliency_share!r}"
            )
        if not isinstance(self.compact_training, bool):
            raise SettingsError(f"compact_training must be True or False; got {self.compact_training!r}")
        if (
            isinstance(self.merge_unkept, bool)
            or not isinstance(self.merge_unkept, int)
            or self.merge_unkept < 0
            or math.isqrt(self.merge_unkept) ** 2 != self.merge_unkept
        ):
            raise SettingsError(
                f"merge_unkept must be 0 (off) or a square number of regions per camera (1, 4, 16, ...); "
                f"got {self.merge_unkept!r}"
            )
        if self.merge_unkept and self.siglip_layer is not None:
            raise SettingsError(
                "merge_unkept and siglip_layer do not go together: SigLIP's later layers start again from each "
                "kept patch's own hidden state. Unset one of them."
            )

    def replace(self, **changes) -> "PruneSettings":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {_known()}")
        return dataclasses.replace(self, **changes)


_active: PruneSettings | None = None  # None: openpi-prune is off


def active() -> PruneSettings:
    """The settings in force (the defaults while openpi-prune is off)."""
    return _active or PruneSettings()


def is_active() -> bool:
    return _active is not None


def activate(settings: PruneSettings | None) -> None:
    """Put `settings` in force (None: off). Only the lifecycle calls this, while no model call runs."""
    global _active
    _active = settings


def _known() -> str:
    return ", ".join(f.name for f in dataclasses.fields(PruneSettings))


_TRUE = ("1", "true", "on", "yes")
_LISTS = ("drop_cameras", "prompt_buckets")
_FALSE = ("0", "false", "off", "no")


def _convert(name: str, text: str):
    field = {f.name: f for f in dataclasses.fields(PruneSettings)}[name]
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if name in _LISTS:  # several values joined by "+" (the variable already separates settings by ",")
        parts = [part.strip() for part in text.split("+") if part.strip()] if text.lower() not in ("", "none") else []
        if name == "drop_cameras":
            return tuple(parts)
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            raise SettingsError(f"{name} must be integers joined by '+', e.g. 32+64+128; got {text!r}") from None
    if name in ("capacity", "siglip_layer"):
        if text.lower() in ("", "auto", "none"):
            return None
        kind = "int"
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SettingsError(f"{name} must be one of {'/'.join(_TRUE + _FALSE)}; got {text!r}")
    if kind in ("int", "float"):
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise SettingsError(
                f"{name} must be a{'n integer' if kind == 'int' else ' number'}; got {text!r}"
            ) from None
    return text


def parse(value: str) -> PruneSettings:
    """Settings from the text of `OPENPI_PRUNE` (`1`, or `key=value` pairs separated by commas)."""
    value = value.strip()
    if value.lower() in _TRUE:
        return PruneSettings()
    changes = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise SettingsError(
                f"{ENV_VAR}={value!r}: {item!r} is not key=value; use 1 for the defaults or e.g. "
                f"{ENV_VAR}=method=scheme_b,mode=compact,capacity=192"
            )
        if key not in {f.name for f in dataclasses.fields(PruneSettings)}:
            raise SettingsError(f"{ENV_VAR}={value!r}: unknown setting {key!r}; known: {_known()}")
        if key in changes:
            raise SettingsError(f"{ENV_VAR}={value!r}: {key!r} is given twice")
        try:
            changes[key] = _convert(key, text.strip())
        except SettingsError as error:
            raise SettingsError(f"{ENV_VAR}={value!r}: {error}") from None
    try:
        return PruneSettings(**changes)
    except SettingsError as error:
        raise SettingsError(f"{ENV_VAR}={value!r}: {error}") from None
