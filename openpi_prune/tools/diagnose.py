"""`openpi-prune diagnose`: why the pruner collapses on your pi0 / pi0.5 checkpoint, and what does not.

Loads an OpenPI checkpoint the way OpenPI serves it (`restore_params`, then the config's
`model.load`) once per registered pruning method, runs `sample_actions` with every scoring on one
observation (image files and a prompt, or one sample from the config's own data loader), and prints
what the pruner kept and why: kept tokens per live camera, query spread, top-1 vote share, score gap,
and a verdict. A second table measures the geometry of the raw embeddings that explains a collapse:
how much of the tokens' energy lies in their shared (mean) direction, and how much in a few
dimensions ("massive activations"). Writes `kept_patches.png` (verbatim LightVLA, and the best method
that did not collapse) and `diagnosis.json` to `--out`.
"""

import argparse
import dataclasses
import difflib
import json
import math
import pathlib
import warnings

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from openpi_prune import errors
from openpi_prune.errors import PruneError

console = Console(width=max(Console().width, 140))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VERBATIM = ("language_only", "lightvla")  # LightVLA's released recipe: prompt-only task tokens, raw scoring
REFERENCE_METHODS = ("keep_all",)  # keep every live patch by design: shown, never judged
TOP_DIMS = 4  # dimensions counted as "massive activations" in the geometry table


class DiagnoseError(PruneError):
    """An input to `openpi-prune diagnose` is wrong (the message says which and what to do)."""


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
# Inputs: config, checkpoint, observation


def find_config(name: str):
    """OpenPI's TrainConfig `name` (as `openpi.training.config.get_config` finds it)."""
    from openpi.training import config as _config

    try:
        return _config.get_config(name)
    except ValueError:
        names = list(_config._CONFIGS_DICT)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5) or difflib.get_close_matches(
            name, names, n=5, cutoff=0.0
        )
        raise DiagnoseError(
            f"OpenPI has no config named {name!r}. Close names: {', '.join(close)}. "
            f"({len(names)} configs are known; OpenPI lists them in openpi/training/config.py.)"
        ) from None


def _is_orbax_params(folder: pathlib.Path) -> bool:
    markers = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
    return folder.is_dir() and any((folder / marker).exists() for marker in markers)


def resolve_params_dir(checkpoint: str | pathlib.Path) -> pathlib.Path:
    """The orbax `params` folder of an OpenPI checkpoint: `<dir>/params`, `<dir>` itself if it is one,
    or `<dir>/<latest step>/params` for a training run's folder. Remote paths (gs://...) are
    downloaded through OpenPI's cache first."""
    text = str(checkpoint)
    if "://" in text:
        from openpi.shared import download

        try:
            path = download.maybe_download(text)
        except Exception as error:  # noqa: BLE001 - any download failure gets the same advice
            raise DiagnoseError(
                f"could not download the checkpoint {text}: {type(error).__name__}: {error}. Download it "
                "yourself and pass the local folder."
            ) from None
    else:
        path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise DiagnoseError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise DiagnoseError(f"checkpoint {path} is a file; give the folder that holds params/ (or params/ itself)")
    if (path / "params").is_dir():
        return path / "params"
    if _is_orbax_params(path):
        return path
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir())
    if steps:
        return path / str(steps[-1]) / "params"
    raise DiagnoseError(
        f"{path} is not an OpenPI checkpoint: it has no params/ folder (OpenPI writes <step>/params, an orbax "
        "checkpoint of {'params': ...}), no orbax metadata and no step folders"
    )


def camera_keys(model_config) -> list[str]:
    spec, _ = model_config.inputs_spec(batch_size=1)
    return list(spec.images)


def read_image(path: pathlib.Path, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """One camera image as OpenPI feeds it: resized with padding (OpenPI's `ResizeImages`), in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DiagnoseError(f"cannot read image {path}: {error}") from None
    from openpi.shared import image_tools

    resized = np.asarray(image_tools.resize_with_pad(pixels, *size))
    return resized.astype(np.float32) / 255.0 * 2.0 - 1.0


def image_paths(cameras: list[str], folder: str | None, pairs: list[str] | None) -> dict[str, pathlib.Path]:
    """Camera key -> image file, from `--images FOLDER` (files named by camera key) or `--image KEY=PATH`."""
    found: dict[str, pathlib.Path] = {}
    if folder is not None:
        root = pathlib.Path(folder).expanduser()
        if not root.is_dir():
            raise DiagnoseError(f"image folder {root} does not exist")
        files = {p.stem: p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        found = {key: files[key] for key in cameras if key in files}
        if not found:
            raise DiagnoseError(
                f"{root} has no image named by a camera of this model; name one file per camera "
                f"{', '.join(k + '.png' for k in cameras)} (missing cameras are masked), or use --image KEY=PATH"
            )
    for pair in pairs or ():
        key, sep, path = pair.partition("=")
        if not sep or not path:
            raise DiagnoseError(f"--image takes KEY=PATH, e.g. --image {cameras[0]}=base.png; got {pair!r}")
        if key not in cameras:
            raise DiagnoseError(f"--image {pair}: this model has no camera {key!r}; its cameras: {', '.join(cameras)}")
        found[key] = pathlib.Path(path).expanduser()
    for key, path in found.items():
        if not path.is_file():
            raise DiagnoseError(f"cannot read image {path} (camera {key}): no such file")
    return found


def parse_prompt_tokens(text: str, max_len: int) -> list[int]:
    from openpi.models import gemma

    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise DiagnoseError(f"--prompt-tokens takes comma-separated token ids, e.g. 2,5780,908; got {text!r}") from None
    if not ids:
        raise DiagnoseError("--prompt-tokens is empty")
    if len(ids) > max_len:
        raise DiagnoseError(f"--prompt-tokens gives {len(ids)} tokens; this config's max_token_len is {max_len}")
    bad = [i for i in ids if not 0 <= i < gemma.PALIGEMMA_VOCAB_SIZE]
    if bad:
        raise DiagnoseError(
            f"--prompt-tokens: ids outside PaliGemma's vocabulary (0..{gemma.PALIGEMMA_VOCAB_SIZE - 1}): {bad}"
        )
    return ids


def tokenize(model_config, prompt: str | None, prompt_tokens: str | None, state: np.ndarray):
    """(tokens, mask) of length `max_token_len`, from token ids or through OpenPI's PaliGemma tokenizer."""
    max_len = model_config.max_token_len
    if prompt_tokens is not None:
        ids = parse_prompt_tokens(prompt_tokens, max_len)
        tokens, mask = np.zeros(max_len, np.int32), np.zeros(max_len, bool)
        tokens[: len(ids)], mask[: len(ids)] = ids, True
        return tokens, mask
    if prompt is None:
        raise DiagnoseError(
            "the pruner scores image patches against the prompt: give --prompt TEXT (tokenized with OpenPI's "
            "PaliGemma tokenizer) or --prompt-tokens IDS (token ids, works offline)"
        )
    from openpi.models import tokenizer as _tokenizer

    try:
        tok = _tokenizer.PaligemmaTokenizer(max_len)
    except Exception as error:  # noqa: BLE001 - the download can fail in many ways
        raise DiagnoseError(
            f"OpenPI's PaliGemma tokenizer could not be loaded ({type(error).__name__}: {error}); it downloads "
            "its sentencepiece model from gs://big_vision on first use. Use --prompt-tokens IDS (the prompt's "
            "token ids) offline, or --prompt TEXT once the tokenizer is in OpenPI's cache (~/.cache/openpi)."
        ) from None
    state_in_prompt = getattr(model_config, "discrete_state_input", False)
    tokens, mask = tok.tokenize(prompt, state if state_in_prompt else None)
    return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def observation_from_images(model_config, paths: dict[str, pathlib.Path], prompt, prompt_tokens):
    """A batch-1 Observation: the given cameras live, the others black and masked; state zeros."""
    import jax.numpy as jnp
    from openpi.models import model as _model

    cameras = camera_keys(model_config)
    state = np.zeros(model_config.action_dim, np.float32)
    tokens, mask = tokenize(model_config, prompt, prompt_tokens, state)
    images, masks = {}, {}
    for key in cameras:
        image = read_image(paths[key]) if key in paths else -np.ones((224, 224, 3), np.float32)
        images[key] = jnp.asarray(image[None])
        masks[key] = jnp.asarray([key in paths])
    return _model.Observation(
        images=images,
        image_masks=masks,
        state=jnp.asarray(state[None]),
        tokenized_prompt=jnp.asarray(tokens[None]),
        tokenized_prompt_mask=jnp.asarray(mask[None]),
    )


def observation_from_data(train_config, checkpoint_dir: pathlib.Path, name: str):
    """The first sample of one batch from OpenPI's own data loader for `train_config`."""
    import jax
    from openpi.training import data_loader

    config = dataclasses.replace(train_config, batch_size=1, num_workers=0)
    # Norm stats as OpenPI serves the checkpoint: from its own assets/ when it has them.
    data = config.data
    assets = getattr(data, "assets", None)
    asset_id = getattr(assets, "asset_id", None) or getattr(data, "repo_id", None)
    ckpt_assets = checkpoint_dir / "assets"
    if assets is not None and isinstance(asset_id, str) and (ckpt_assets / asset_id).is_dir():
        config = dataclasses.replace(
            config, data=dataclasses.replace(data, assets=dataclasses.replace(assets, assets_dir=str(ckpt_assets)))
        )
    try:
        loader = data_loader.create_data_loader(config, shuffle=False, num_batches=1)
        observation, _ = next(iter(loader))
    except Exception as error:  # noqa: BLE001 - datasets, norm stats and tokenizers fail in many ways
        raise DiagnoseError(
            f"OpenPI's data loader for config {name!r} failed: {type(error).__name__}: {error}. It may need to "
            "download the dataset, its norm stats or the tokenizer. Offline, use --images FOLDER or --image "
            "KEY=PATH with --prompt-tokens IDS instead of --data."
        ) from None
    observation = jax.tree.map(lambda x: x[:1], observation)
    if not any(bool(np.asarray(m)[0]) for m in observation.image_masks.values()):
        raise DiagnoseError(
            f"the batch from config {name!r}'s data loader has no live camera (OpenPI's fake data masks every "
            "camera): there is nothing to prune. Use --images FOLDER or --image KEY=PATH."
        )
    if observation.tokenized_prompt is None or not bool(np.asarray(observation.tokenized_prompt_mask)[0].any()):
        raise DiagnoseError(
            f"the batch from config {name!r}'s data loader has no prompt token: the pruner votes against the "
            "prompt. Use --images/--image with --prompt or --prompt-tokens."
        )
    return observation


# ----------------------------------------------------------------------------------------------------------------------
# Geometry of the raw embeddings


def geometry(tokens: np.ndarray, top: int = TOP_DIMS) -> dict[str, float]:
    """How anisotropic a set of tokens [k, d] is.

    shared            share of their energy along their mean direction (1/d for isotropic tokens;
                      near 1 when one direction dominates: LightVLA's weight-free RMS norm keeps it,
                      and every query then points the same way)
    top_dims          share of their energy in the `top` largest dimensions (top/d if isotropic)
    top_dims_centred  the same after removing the mean: dimensions that are huge *and vary*
                      ("massive activations"), which centring alone does not remove
    """
    x = np.asarray(tokens, np.float64)
    k, d = x.shape
    energy = max(float(np.sum(x**2)), 1e-30)
    mean = x.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    shared = float(np.sum((x @ (mean / norm)) ** 2) / energy) if norm > 0 else 0.0
    per_dim = np.sort(np.sum(x**2, axis=0))[::-1]
    centred = np.sort(np.sum((x - mean) ** 2, axis=0))[::-1]
    return {
        "tokens": k,
        "width": d,
        "shared": shared,
        "top_dims": float(per_dim[:top].sum() / energy),
        "top_dims_centred": float(centred[:top].sum() / max(centred.sum(), 1e-30)),
        "isotropic": min(top, d) / d,
    }


def embedding_geometry(model, observation) -> dict[str, dict[str, float]]:
    """Geometry of the live cameras' patch tokens and the live prompt tokens, as `embed_prefix` makes them."""
    patches = []
    for name, image in observation.images.items():
        if bool(np.asarray(observation.image_masks[name])[0]):
            tokens, _ = model.PaliGemma.img(image[:1], train=False)
            patches.append(np.asarray(tokens[0], np.float32))
    text = model.PaliGemma.llm(observation.tokenized_prompt[:1], method="embed")
    live = np.asarray(observation.tokenized_prompt_mask)[0]
    return {
        "image patches": geometry(np.concatenate(patches)),
        "prompt tokens": geometry(np.asarray(text[0], np.float32)[live]),
    }


def _hints(geo: dict[str, dict[str, float]]) -> list[str]:
    shared = [f"{what} {g['shared']:.0%}" for what, g in geo.items() if g["shared"] > 0.5]
    massive = [
        f"{what} {g['top_dims_centred']:.0%}"
        for what, g in geo.items()
        if g["top_dims_centred"] > max(0.2, 10 * g["isotropic"])
    ]
    hints = []
    if shared:
        hints.append(
            f"One shared direction holds most of the energy ({', '.join(shared)}). LightVLA's weight-free RMS norm "
            "keeps it, so every patch's query points the same way and every row votes for the same few patches. "
            "Scoring 'centred' or 'robust' removes it."
        )
    if massive:
        hints.append(
            f"After centring, {TOP_DIMS} dimensions still hold much of the energy ({', '.join(massive)}): massive "
            "activations, which decide every similarity. Scoring 'robust' (per-dimension median / MAD, clipped) "
            "gives each dimension an equal say."
        )
    return hints


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
    fresh = sorted(k for k in checkpoints.fresh_parameters(model_config) if k not in params) if untrained else []
    return model, fresh


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


# ----------------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def _verdict(row: Row) -> str:
    colour = {"collapsed": "red", "healthy": "green", "reference": "dim", "error": "red"}[row.verdict]
    return f"[{colour}]{row.verdict}[/]"


def rows_table(rows: list[Row], cameras: list[str], min_kept: float, min_spread: float) -> Table:
    table = Table(
        "method",
        "scoring",
        f"kept per live camera\n({' / '.join(cameras)})",
        "query spread",
        "top-1 vote share",
        "score gap",
        "verdict",
        "notes",
        title=f"pruner on your weights (collapsed: < {min_kept:g} kept per live camera or query spread < {min_spread:g})",
    )
    for row in rows:
        notes = []
        if row.fresh:
            notes.append(f"untrained {', '.join(row.fresh)}")
        if row.error:
            notes.append(f"[red]{row.error}[/]")
        if (row.method, row.scoring) == VERBATIM:
            notes.append("verbatim LightVLA")
        kept = "-" if row.kept_per_camera is None else " / ".join(str(k) for k in row.kept_per_camera)
        table.add_row(
            row.method,
            row.scoring,
            kept,
            _fmt(row.query_spread),
            _fmt(row.top1_vote_share, ".2f"),
            _fmt(row.score_gap),
            _verdict(row),
            "; ".join(notes),
        )
    return table


def geometry_table(geo: dict) -> Table:
    table = Table(
        "raw embeddings",
        "tokens",
        "width",
        "energy in the shared direction",
        f"energy in the top {TOP_DIMS} dims",
        f"top {TOP_DIMS} dims, after centring",
        "isotropic reference",
        title="geometry of the tokens the pruner scores (before any scoring)",
    )
    for what, g in geo.items():
        table.add_row(
            what,
            str(g["tokens"]),
            str(g["width"]),
            f"{g['shared']:.1%}",
            f"{g['top_dims']:.1%}",
            f"{g['top_dims_centred']:.1%}",
            f"{g['isotropic']:.2%}",
        )
    return table


def picture(observation, shown: list[tuple[str, Row]], path: pathlib.Path) -> pathlib.Path:
    """Kept patches (bright) on each live camera, one row per `shown` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cameras = list(observation.images)
    live = [c for c, name in enumerate(cameras) if bool(np.asarray(observation.image_masks[name])[0])]
    fig, axes = plt.subplots(
        len(shown), len(live), figsize=(3.4 * len(live), 3.7 * len(shown)), squeeze=False, layout="constrained"
    )
    for r, (title, row) in enumerate(shown):
        per_camera = row.kept_mask.shape[-1] // len(cameras)
        grid = math.isqrt(per_camera)
        for ax, c in zip(axes[r], live, strict=True):
            image = (np.asarray(observation.images[cameras[c]][0], np.float32) + 1) / 2
            kept = row.kept_mask[c * per_camera : (c + 1) * per_camera]
            if grid * grid == per_camera:
                cell = image.shape[0] // grid
                shade = np.kron(kept.reshape(grid, grid), np.ones((cell, cell)))
                shade = np.pad(shade, ((0, image.shape[0] - shade.shape[0]), (0, image.shape[1] - shade.shape[1])))
                image = image * (0.25 + 0.75 * shade)[..., None]
            ax.imshow(np.clip(image, 0, 1))
            ax.set_title(f"{title}\n{cameras[c]}: {int(kept.sum())} of {per_camera} kept", fontsize=8)
            ax.axis("off")
    fig.suptitle("image tokens the pruner kept (bright)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="OpenPI TrainConfig name, e.g. pi05_libero")
    parser.add_argument(
        "checkpoint", help="checkpoint folder as OpenPI writes it (<dir>/params), a params folder, or a run's folder"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", metavar="FOLDER", help="one image per camera, named by camera key (base_0_rgb.png)")
    source.add_argument("--image", action="append", metavar="KEY=PATH", help="one camera's image (repeatable)")
    source.add_argument("--data", action="store_true", help="one sample from OpenPI's data loader for CONFIG")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="task prompt, tokenized by OpenPI's PaliGemma tokenizer")
    prompt.add_argument("--prompt-tokens", metavar="IDS", help="prompt token ids, comma-separated (offline)")
    parser.add_argument("--out", default="openpi-prune-diagnose", help="folder for the picture and diagnosis.json")
    parser.add_argument("--siglip", default=None, metavar="VARIANT", help="SigLIP variant (default: the config's own)")
    parser.add_argument("--min-kept", type=float, default=8.0, help="collapsed below this mean kept per live camera")
    parser.add_argument("--min-spread", type=float, default=0.05, help="collapsed below this query spread")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "checkpoint"),
        default="bfloat16",
        help="parameter dtype to restore (OpenPI serves in bfloat16; default %(default)s)",
    )
    parser.add_argument("--methods", metavar="A,B", help="only these methods (default: every registered one)")
    parser.add_argument("--scorings", metavar="A,B", help="only these scorings (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise sample_actions starts from")
    return parser


def _subset(text: str | None, known: list[str], what: str) -> list[str] | None:
    if not text:
        return None
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise DiagnoseError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def _restore(params_dir: pathlib.Path, dtype: str) -> dict:
    import jax.numpy as jnp
    from openpi.models import model as _model

    try:
        return _model.restore_params(params_dir, dtype=None if dtype == "checkpoint" else jnp.dtype(dtype))
    except Exception as error:  # noqa: BLE001
        raise DiagnoseError(
            f"could not restore the parameters in {params_dir}: {type(error).__name__}: {error}"
        ) from None


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DiagnoseError as error:
        Console(stderr=True, width=console.width).print(f"[red]error:[/] {error}", highlight=False)
        return 1


def _run(args: argparse.Namespace) -> int:
    from openpi.models import pi0_config

    from openpi_prune import settings
    from openpi_prune.pruner import plugins

    methods = _subset(args.methods, list(plugins.known_methods()), "method(s)")
    scorings = _subset(args.scorings, list(settings.SCORINGS), "scoring(s)")
    train_config = find_config(args.config)
    if not isinstance(train_config.model, pi0_config.Pi0Config):
        raise DiagnoseError(
            f"config {args.config!r} has a {type(train_config.model).__name__}; openpi-prune prunes pi0 / pi0.5 "
            "(Pi0Config) models"
        )
    params_dir = resolve_params_dir(args.checkpoint)
    checkpoint_dir = params_dir.parent
    model_config = train_config.model
    if args.data:
        if args.prompt is not None or args.prompt_tokens is not None:
            raise DiagnoseError("--data takes the prompt from the data loader; drop --prompt / --prompt-tokens")
        observation = observation_from_data(train_config, checkpoint_dir, args.config)
    elif args.images is not None or args.image:
        paths = image_paths(camera_keys(model_config), args.images, args.image)
        observation = observation_from_images(model_config, paths, args.prompt, args.prompt_tokens)
    else:
        raise DiagnoseError("give an observation: --images FOLDER, --image KEY=PATH (repeatable) or --data")

    cameras = list(observation.images)
    live_cameras = [k for k in cameras if bool(np.asarray(observation.image_masks[k])[0])]
    live_tokens = int(np.asarray(observation.tokenized_prompt_mask)[0].sum())
    console.print(
        f"[bold]{args.config}[/] ({'pi0.5' if model_config.pi05 else 'pi0'}, PaliGemma {model_config.paligemma_variant},"
        f" action expert {model_config.action_expert_variant}, SigLIP {args.siglip or 'as OpenPI builds it'}) "
        f"from {params_dir}"
    )
    masked = [k for k in cameras if k not in live_cameras]
    console.print(
        f"live cameras: {', '.join(live_cameras)}; masked: {', '.join(masked) or 'none'}; "
        f"prompt: {live_tokens} live tokens"
    )

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"restoring {params_dir} ({args.dtype})", total=None)
        params = _restore(params_dir, args.dtype)
        progress.remove_task(task)
        rows, geo = diagnose(
            train_config,
            params,
            observation,
            siglip=args.siglip,
            methods=methods,
            scorings=scorings,
            min_kept=args.min_kept,
            min_spread=args.min_spread,
            seed=args.seed,
            progress=progress,
        )

    console.print(rows_table(rows, live_cameras, args.min_kept, args.min_spread))
    fresh = sorted({name for row in rows for name in row.fresh})
    if fresh:
        console.print(
            f"untrained: the checkpoint has no {', '.join(fresh)} (it was trained without those methods), so their "
            "rows prune with freshly initialised values, as OpenPI's loader gives them with openpi-prune enabled. "
            "Fine-tune with the method enabled to train them.",
            highlight=False,
        )
    if geo:
        console.print(geometry_table(geo))
        for hint in _hints(geo):
            console.print(f"- {hint}", highlight=False)
    verbatim = next((r for r in rows if (r.method, r.scoring) == VERBATIM and r.kept_mask is not None), None)
    best = best_healthy(rows)
    if verbatim is not None and verbatim.verdict == "collapsed":
        console.print(
            f"verbatim LightVLA collapsed: {verbatim.mean_kept:.1f} kept per live camera, query spread "
            f"{verbatim.query_spread:.3f}, the top patch gets {verbatim.top1_vote_share:.0%} of the votes."
        )
    if best is not None:
        console.print(
            f"best method that did not collapse: [bold]{best.method}[/] with scoring [bold]{best.scoring}[/] "
            f"(query spread {best.query_spread:.3f}, {best.mean_kept:.1f} kept per live camera); enable it with "
            f"openpi_prune.enable(method={best.method!r}, scoring={best.scoring!r})"
        )
    else:
        console.print("[red]every method collapsed (or failed) on these weights and this observation[/]")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = [(f"verbatim LightVLA ({VERBATIM[0]}, {VERBATIM[1]})", verbatim)] if verbatim is not None else []
    if best is not None:
        shown.append((f"best healthy: {best.method}, {best.scoring}", best))
    image_path = picture(observation, shown, out / "kept_patches.png") if shown else None
    if image_path is not None:
        console.print(f"kept patches per camera: {image_path}")
    report = {
        "config": args.config,
        "params": str(params_dir),
        "cameras": cameras,
        "live_cameras": live_cameras,
        "live_prompt_tokens": live_tokens,
        "thresholds": {"min_kept_per_live_camera": args.min_kept, "min_query_spread": args.min_spread},
        "rows": [r.as_dict() for r in rows],
        "geometry": geo,
        "best": None if best is None else {"method": best.method, "scoring": best.scoring},
        "picture": None if image_path is None else str(image_path),
    }
    (out / "diagnosis.json").write_text(json.dumps(report, indent=2))
    console.print(f"report: {out / 'diagnosis.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="openpi-prune diagnose", description=__doc__))
    return run(parser.parse_args(argv))
