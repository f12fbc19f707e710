"""`diagnose`'s runs: the checkpoint loaded as OpenPI serves it, once per method, and every scoring
run on the observation, each judged."""

import dataclasses
import warnings

import numpy as np
from rich.console import Console
from rich.progress import Progress

from openpi_prune import errors
from openpi_prune.tools.diagnose.inputs import DiagnoseError
from openpi_prune.tools.diagnose.measures import embedding_geometry

console = Console(width=max(Console().width, 140))
VERBATIM = ("language_only", "lightvla")  # LightVLA's released recipe: prompt-only task tokens, raw scoring
REFERENCE_METHODS = ("keep_all",)  # keep every live patch by design: shown, never judged


@dataclasses.dataclass
class Row:
    method: str
    scoring: str
    fresh: list[str]  # parameters the checkpoint lacked, initialised from scratch
    kept_per_camera: list[int] | None = None  # live cameras only
    query_spread: float | None = None
    top1_vote_share: float | None = None
    score_gap: float | None = None
    kept_mask: np.ndarray | None = None  # [all cameras' patches]
    verdict: str = "error"
    error: str | None = None

    @property
    def mean_kept(self) -> float | None:
        return None if self.kept_per_camera is None else float(np.mean(self.kept_per_camera))

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.pop("kept_mask")
        return {**fields, "mean_kept_per_live_camera": self.mean_kept}


# ----------------------------------------------------------------------------------------------------------------------
# Running the pruner


def _load_model(model_config, params: dict, siglip: str | None):
    """`model_config.load(params)` as OpenPI serves a checkpoint; returns the model and the names of the
    parameters the active method added that the checkpoint lacked (they start fresh, with an
    `UntrainedParametersWarning`, which is reported here instead of shown)."""
    from openpi_prune.adapter import checkpoints
    from openpi_prune.tools import small

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", errors.UntrainedParametersWarning)
        with small.siglip_variant(siglip):
            model = model_config.load(params)
    untrained = False
    for warning in caught:
        if issubclass(warning.category, errors.UntrainedParametersWarning):
            untrained = True
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model, (checkpoints.untrained(model_config, params) if untrained else [])


def _judge(row: Row, min_kept: float, min_spread: float) -> str:
    if row.method in REFERENCE_METHODS:
        return "reference"
    collapsed = row.mean_kept < min_kept or row.query_spread < min_spread
    return "collapsed" if collapsed else "healthy"


def _run_one(model, observation, row: Row, live: np.ndarray, seed: int) -> None:
    import jax

    from openpi_prune import telemetry

    with telemetry.collect() as reports:
        actions = model.sample_actions(jax.random.key(seed), observation, num_steps=1)
    jax.block_until_ready(actions)
    if not reports:
        raise RuntimeError("the pruner reported nothing: was sample_actions compiled before openpi-prune was enabled?")
    values = {k: np.asarray(v) for k, v in reports[-1].items()}
    row.kept_per_camera = [int(v) for v in values["kept_per_camera"][0][live]]
    row.query_spread = float(values["query_spread"][0])
    row.top1_vote_share = float(values["top1_vote_share"][0])
    row.score_gap = float(values["score_gap"][0])
    row.kept_mask = values["kept_mask"][0]
    if not np.isfinite(np.asarray(actions)).all():
        row.error = "sample_actions gave non-finite actions"


def diagnose(
    train_config,
    params: dict,
    observation,
    *,
    siglip: str | None = None,
    methods: list[str] | None = None,
    scorings: list[str] | None = None,
    min_kept: float = 8.0,
    min_spread: float = 0.05,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[list[Row], dict]:
    """Every method x scoring on `params`; returns the rows and the embeddings' geometry."""
    import openpi_prune
    from openpi_prune import settings
    from openpi_prune.pruner import plugins

    methods = methods or default_methods(list(plugins.known_methods()))
    scorings = scorings or list(settings.SCORINGS)
    live = np.array([bool(np.asarray(m)[0]) for m in observation.image_masks.values()])
    rows: list[Row] = []
    geo: dict = {}
    task = (
        progress.add_task("pruning with each method and scoring", total=len(methods) * len(scorings))
        if progress
        else None
    )
    with (
        warnings.catch_warnings(),
        openpi_prune.enabled(method=methods[0], scoring=scorings[0], mode="masked", warn_below=0),
    ):
        warnings.simplefilter("ignore", errors.TracedBeforeChangeWarning)  # each setting is run anew
        for method in methods:
            # Before the model is made: a method may add parameters when it is created.
            openpi_prune.enable(method=method, scoring=scorings[0], mode="masked", warn_below=0)
            try:
                model, fresh = _load_model(train_config.model, params, siglip)
            except Exception as error:  # noqa: BLE001 - one method's failure must not hide the others
                message = _short(f"{type(error).__name__}: {error}")
                if not geo:  # nothing has loaded yet: the checkpoint itself does not fit the config
                    raise DiagnoseError(
                        f"could not load the checkpoint as the model of config {train_config.name!r} "
                        f"(method {method}): {message}. Is it this config's checkpoint? If it was trained with "
                        "another SigLIP than OpenPI's So400m/14, name it with --siglip."
                    ) from None
                for scoring in scorings:
                    rows.append(Row(method, scoring, [], error=f"loading: {message}"))
                    if progress:
                        progress.advance(task)
                continue
            if not geo:
                geo = embedding_geometry(model, observation)
            for scoring in scorings:
                openpi_prune.enable(method=method, scoring=scoring, mode="masked", warn_below=0)
                row = Row(method, scoring, fresh)
                if progress:
                    progress.update(task, description=f"pruning: {method}, {scoring}")
                try:
                    _run_one(model, observation, row, live, seed)
                    row.verdict = _judge(row, min_kept, min_spread)
                except Exception as error:  # noqa: BLE001
                    row.error, row.verdict = _short(f"{type(error).__name__}: {error}"), "error"
                rows.append(row)
                if progress:
                    progress.advance(task)
            del model
    return rows, geo


def default_methods(known: list[str]) -> list[str]:
    """Every registered method: verbatim LightVLA's `language_only` first, the `keep_all` reference last."""
    first = [m for m in (VERBATIM[0],) if m in known]
    last = [m for m in REFERENCE_METHODS if m in known]
    return first + [m for m in known if m not in first + last] + last


def _short(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def best_healthy(rows: list[Row]) -> Row | None:
    """The healthy row whose queries differ most (highest query spread), reference methods aside."""
    healthy = [r for r in rows if r.verdict == "healthy" and r.method not in REFERENCE_METHODS]
    return max(healthy, key=lambda r: (r.query_spread, r.score_gap)) if healthy else None
