"""`openpi-prune diagnose` on real OpenPI checkpoints of a small pi0.5, written by OpenPI's own checkpoint code."""

import argparse
import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from flax import nnx

import openpi_prune
from openpi_prune.tools import cli, diagnose, small
from openpi_prune.tools.diagnose import measures, running
from openpi_prune.tools.lab import scenes

CONFIG = "diagnose_small_pi05"
SPEC = scenes.SceneSpec(patch=14, block=4)
SIGLIP = "mu/14"


@pytest.fixture(scope="module")
def train_config():
    """A small pi0.5 TrainConfig (dummy Gemma), registered where `get_config` looks configs up."""
    from openpi.training import config as _config

    config = dataclasses.replace(_config.get_config("debug_pi05"), name=CONFIG, model=small.config(pi05=True))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_config._CONFIGS_DICT, CONFIG, config)
        yield config


class _NoAssets:
    """What `save_state` asks the data loader for: a data config without norm stats to copy."""

    def data_config(self):
        from openpi.training import config as _config

        return _config.DataConfig()


def _save(root, model):
    """Save `model` as OpenPI's train script does: a TrainState through `checkpoints.save_state`, step 0."""
    import optax
    from openpi.training import checkpoints
    from openpi.training import utils as training_utils

    params = nnx.state(model, nnx.Param)
    tx = optax.identity()
    state = training_utils.TrainState(
        step=0, params=params, model_def=nnx.graphdef(model), opt_state=tx.init(params), tx=tx, ema_decay=None
    )
    manager, _ = checkpoints.initialize_checkpoint_dir(root, keep_period=None, overwrite=False, resume=False)
    checkpoints.save_state(manager, state, _NoAssets(), 0)
    manager.wait_until_finished()
    return root / "0"


@pytest.fixture(scope="module")
def checkpoints(train_config, tmp_path_factory):
    """Two checkpoints of one small pi0.5 made without openpi-prune: as created, and with one direction shared
    by every image and prompt token (the anisotropy that makes LightVLA's vote collapse)."""
    with openpi_prune.disabled():
        model = small.create(train_config.model, siglip=SIGLIP)
        plain = _save(tmp_path_factory.mktemp("plain") / "run", model)
        small.add_shared_component(model, scale=2.0)
        shared = _save(tmp_path_factory.mktemp("shared") / "run", model)
    return {"plain": plain, "shared": shared}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A rendered scene saved as one PNG per live camera (the third camera has no file: masked), and its prompt."""
    from PIL import Image

    batch = scenes.render(3, 1, SPEC)
    folder = tmp_path_factory.mktemp("images")
    for camera in scenes.TABLES:
        pixels = np.round((batch.images[camera][0] + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{camera}.png")
    ids = ",".join(str(t) for t in batch.tokens[0][batch.token_mask[0]])
    return folder, ids


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = diagnose.main(argv)
    return code, out.getvalue(), err.getvalue()


# Three methods keep the test near two minutes on 2 CPU cores (each method x scoring is a real sample_actions):
# the prompt-only recipe, one that adds a parameter a plain checkpoint lacks, and the keep-everything reference.
METHODS = ("language_only", "scheme_b", "keep_all")


@pytest.fixture(scope="module")
def shared_run(train_config, checkpoints, scene, tmp_path_factory):
    """Every scoring of three methods on the shared-direction checkpoint, through the command's main."""
    folder, ids = scene
    out = tmp_path_factory.mktemp("diagnosis")
    argv = [CONFIG, str(checkpoints["shared"]), "--images", str(folder), "--prompt-tokens", ids]
    argv += ["--out", str(out), "--siglip", SIGLIP, "--methods", ",".join(METHODS)]
    code, stdout, stderr = _main(argv)
    report = json.loads((out / "diagnosis.json").read_text()) if code == 0 else None
    return code, stdout, stderr, report, out


def _row(report, method, scoring):
    return next(r for r in report["rows"] if r["method"] == method and r["scoring"] == scoring)


def test_every_scoring_of_each_method_is_run(shared_run):
    code, stdout, stderr, report, _ = shared_run
    assert code == 0, stderr
    pairs = [(r["method"], r["scoring"]) for r in report["rows"]]
    assert pairs == [(m, s) for m in METHODS for s in ("lightvla", "centred", "robust")]
    assert not [r for r in report["rows"] if r["error"]], stdout
    assert report["live_cameras"] == list(scenes.TABLES)  # the camera without a file is masked
    assert all(len(r["kept_per_camera"]) == 2 for r in report["rows"])
    assert "query spread" in stdout and "verdict" in stdout


def test_by_default_every_registered_method_is_diagnosed():
    from openpi_prune.pruner import plugins

    parser = diagnose.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([CONFIG, "ckpt"])
    assert args.methods is None and args.scorings is None
    order = running.default_methods(list(plugins.known_methods()))
    assert sorted(order) == sorted(plugins.known_methods())
    assert {"language_only", "scheme_b", "scheme_a", "action_queries", "keep_all"} <= set(order)
    assert order[0] == "language_only" and order[-1] == "keep_all"


def test_verbatim_lightvla_collapses_on_a_shared_direction(shared_run):
    _, stdout, _, report, _ = shared_run
    verbatim = _row(report, "language_only", "lightvla")
    assert verbatim["verdict"] == "collapsed"
    assert verbatim["mean_kept_per_live_camera"] < 8
    assert "verbatim LightVLA collapsed" in stdout
    # The geometry that explains it: most of the patches' energy lies along one shared direction.
    assert report["geometry"]["image patches"]["shared"] > 0.5
    assert "shared direction" in stdout


def test_a_robust_scoring_stays_healthy(shared_run):
    _, _, _, report, _ = shared_run
    robust = [r for r in report["rows"] if r["scoring"] == "robust" and r["method"] != "keep_all"]
    assert any(r["verdict"] == "healthy" for r in robust), robust
    assert report["best"] is not None and report["best"]["scoring"] != "lightvla"


def test_fresh_parameters_are_reported_not_fatal(shared_run):
    _, stdout, _, report, _ = shared_run
    assert _row(report, "scheme_b", "robust")["fresh"] == ["prune_action_proj"]
    assert _row(report, "language_only", "robust")["fresh"] == []
    assert "untrained: the checkpoint has no prune_action_proj" in " ".join(stdout.split())
    assert _row(report, "keep_all", "lightvla")["verdict"] == "reference"


def test_the_picture_is_written(shared_run):
    _, _, _, report, out = shared_run
    picture = out / "kept_patches.png"
    assert report["picture"] == str(picture)
    assert picture.stat().st_size > 10_000
    from PIL import Image

    with Image.open(picture) as image:
        assert image.size[1] > 500  # two rows: verbatim LightVLA and the best healthy method


def test_a_params_folder_and_single_images_through_the_cli(train_config, checkpoints, scene, tmp_path, capsys):
    folder, ids = scene
    argv = [
        "diagnose",
        CONFIG,
        str(checkpoints["plain"] / "params"),
        "--image",
        f"base_0_rgb={folder / 'base_0_rgb.png'}",
    ]
    argv += ["--prompt-tokens", ids, "--siglip", SIGLIP, "--methods", "language_only", "--scorings", "lightvla"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["live_cameras"] == ["base_0_rgb"]
    assert [(r["method"], r["scoring"]) for r in report["rows"]] == [("language_only", "lightvla")]
    assert len(report["rows"][0]["kept_per_camera"]) == 1


def test_a_training_run_folder_resolves_to_its_latest_step(checkpoints):
    run_folder = checkpoints["plain"].parent
    assert diagnose.resolve_params_dir(run_folder) == checkpoints["plain"] / "params"
    assert diagnose.resolve_params_dir(checkpoints["plain"]) == checkpoints["plain"] / "params"
    assert diagnose.resolve_params_dir(checkpoints["plain"] / "params") == checkpoints["plain"] / "params"


def test_geometry_of_isotropic_and_anisotropic_tokens():
    rng = np.random.default_rng(0)
    isotropic = measures.geometry(rng.normal(size=(512, 64)))
    assert isotropic["shared"] < 0.05 and isotropic["top_dims"] < 0.15
    shared = measures.geometry(rng.normal(size=(512, 64)) + 3 * rng.normal(size=64))
    assert shared["shared"] > 0.8 and shared["top_dims_centred"] < 0.15
    massive = rng.normal(size=(512, 64))
    massive[:, :2] *= 50
    assert measures.geometry(massive)["top_dims_centred"] > 0.9


# Errors: each names what is wrong, before any model is built.


def test_an_unknown_config_lists_close_names(checkpoints, scene):
    folder, ids = scene
    code, _, stderr = _main(["pi05_libro", str(checkpoints["plain"]), "--images", str(folder), "--prompt-tokens", ids])
    assert code == 1
    assert "no config named 'pi05_libro'" in stderr and "pi05_libero" in stderr


def test_a_missing_checkpoint_folder(train_config, scene, tmp_path):
    folder, ids = scene
    code, _, stderr = _main([CONFIG, str(tmp_path / "nowhere"), "--images", str(folder), "--prompt-tokens", ids])
    assert code == 1 and "does not exist" in stderr


def test_a_folder_that_is_not_a_checkpoint(train_config, scene, tmp_path):
    folder, ids = scene
    code, _, stderr = _main([CONFIG, str(tmp_path), "--images", str(folder), "--prompt-tokens", ids])
    assert code == 1 and "not an OpenPI checkpoint" in stderr


def test_a_checkpoint_of_another_model(train_config, checkpoints, scene):
    # Without --siglip the config builds OpenPI's So400m/14, which the mu/14 checkpoint does not fit.
    folder, ids = scene
    code, _, stderr = _main([CONFIG, str(checkpoints["plain"]), "--images", str(folder), "--prompt-tokens", ids])
    assert code == 1 and "could not load the checkpoint" in stderr and "--siglip" in stderr


def test_an_image_that_cannot_be_read(train_config, checkpoints, scene, tmp_path):
    _, ids = scene
    (tmp_path / "base_0_rgb.png").write_bytes(b"not a png")
    code, _, stderr = _main([CONFIG, str(checkpoints["plain"]), "--images", str(tmp_path), "--prompt-tokens", ids])
    assert code == 1 and "cannot read image" in stderr and "base_0_rgb.png" in stderr


def test_an_unknown_camera_key(train_config, checkpoints, scene):
    folder, ids = scene
    argv = [CONFIG, str(checkpoints["plain"]), "--image", f"top={folder / 'base_0_rgb.png'}", "--prompt-tokens", ids]
    code, _, stderr = _main(argv)
    assert code == 1 and "no camera 'top'" in stderr and "base_0_rgb" in stderr


def test_no_prompt_names_both_options(train_config, checkpoints, scene):
    folder, _ = scene
    code, _, stderr = _main([CONFIG, str(checkpoints["plain"]), "--images", str(folder)])
    assert code == 1 and "--prompt TEXT" in stderr and "--prompt-tokens" in stderr


def test_a_tokenizer_that_cannot_load_names_both_options(train_config, checkpoints, scene, monkeypatch):
    from openpi.shared import download

    def offline(*_args, **_kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(download, "maybe_download", offline)
    folder, _ = scene
    code, _, stderr = _main(
        [CONFIG, str(checkpoints["plain"]), "--images", str(folder), "--prompt", "pick up the red block"]
    )
    assert code == 1
    assert "tokenizer could not be loaded" in stderr and "--prompt-tokens" in stderr and "--prompt TEXT" in stderr


def test_data_from_a_fake_data_config_has_nothing_to_prune(train_config, checkpoints):
    # debug_pi05's FakeDataConfig yields observations whose cameras are all masked.
    code, _, stderr = _main([CONFIG, str(checkpoints["plain"]), "--data"])
    assert code == 1 and "no live camera" in stderr
