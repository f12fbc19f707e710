"""A lab checkpoint small enough to commit: only the parameters training changes (a baseline's, or
a fine-tuned variant's with its pruner), and the commit of the code that made it."""

import contextlib
import hashlib
import pathlib
import subprocess

import numpy as np
from flax import traverse_util

import openpi_prune
from openpi_prune.tools.lab import scenes, train


def commit() -> str:
    """The commit of the code this process runs (with `+dirty` when it had uncommitted changes): read
    once, when the lab was imported, so that a commit made while a long run goes on is not taken for
    the code it loaded."""
    return _LOADED


def _read_commit(package: pathlib.Path) -> str:
    """HEAD of the checkout holding `package`, `+dirty` where a file under `package` differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


_LOADED = _read_commit(pathlib.Path(__file__).resolve().parents[2])  # the openpi_prune package


def descends_from(commit: str, ancestor: str) -> bool:
    """Whether `commit` (a run's recorded commit, `+dirty` or not) has `ancestor` in its history; False
    where git cannot tell (not a checkout, an unknown commit)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        found = subprocess.run(
            ["git", "merge-base", "--is-ancestor", ancestor, commit.removesuffix("+dirty")],
            cwd=root,
            capture_output=True,
        )
    except OSError:
        return False
    return found.returncode == 0


def digest(params: dict) -> str:
    """A short hash of a model's parameters: what a resumed run checks it still evaluates."""
    hashed = hashlib.blake2b(digest_size=8)
    for name, value in sorted(traverse_util.flatten_dict(params, sep="/").items()):
        hashed.update(name.encode())
        hashed.update(np.ascontiguousarray(np.asarray(value)).tobytes())
    return hashed.hexdigest()


# --- the baseline checkpoint: only what training changes, so that it is small enough to keep -------


def save_trained(model, path: pathlib.Path, frozen: dict) -> None:
    """The parameters that differ from a fresh model's `frozen` ones (the prompt's embedding table
    stays as created), as one `.npz`."""
    flat = traverse_util.flatten_dict(train.params_of(model), sep="/")
    kept = {k: np.asarray(v) for k, v in flat.items() if k not in frozen}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **kept)


def load_trained(path: pathlib.Path, spec: scenes.SceneSpec, pruned: bool = False) -> dict:
    """Full params: a fresh model's (seeded as the baseline was; unpruned, or with `pruned` the
    settings in force, for a fine-tuned variant's own parameters), the saved ones written over them."""
    with contextlib.nullcontext() if pruned else openpi_prune.disabled():
        params = traverse_util.flatten_dict(train.params_of(train.create(spec)), sep="/")
    with np.load(path) as saved:
        unknown = set(saved.files) - set(params)
        if unknown:
            raise SystemExit(f"{path} holds parameters this model lacks ({', '.join(sorted(unknown)[:3])}, ...)")
        # A fine-tune saved all it trained: one without a parameter of these settings' pruner was made
        # under others, and would run with that parameter fresh.
        absent = {k for k in params if k.startswith("prune_")} - set(saved.files)
        if pruned and absent:
            raise SystemExit(
                f"{path} lacks {', '.join(sorted(absent))} of the pruner now in force: it was fine-tuned under other "
                "settings (before the default head took a hidden layer, relevance_hidden was 0). Run it under the "
                "settings its closed-loop row records, or from the commit that made it."
            )
        reshaped = [k for k in saved.files if saved[k].shape != params[k].shape]
        if reshaped:
            k = reshaped[0]
            raise SystemExit(
                f"{path} holds {k} of shape {saved[k].shape}, where this model's is {params[k].shape}: it was "
                "made for a model of another shape (another --siglip-depth?). Load it with the plan that made it."
            )
        params.update({k: saved[k] for k in saved.files})
    return traverse_util.unflatten_dict(params, sep="/")


def frozen(spec: scenes.SceneSpec) -> set[str]:
    with openpi_prune.disabled():
        flat = traverse_util.flatten_dict(train.params_of(train.create(spec)), sep="/")
    return {k for k in flat if "input_embedding" in k}
