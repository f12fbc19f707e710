"""`diagnose`'s inputs: the config, the checkpoint's params, and one observation (image files and a
prompt, or a sample of the config's own data)."""

import dataclasses
import difflib
import pathlib

import numpy as np

from openpi_prune.errors import PruneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DiagnoseError(PruneError):
    """An input to `openpi-prune diagnose` is wrong (the message says which and what to do)."""


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
