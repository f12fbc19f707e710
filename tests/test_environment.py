"""`OPENPI_PRUNE` in a fresh interpreter, the way a user's program meets it.

OpenPI must be patched before any of its code that a patch affects runs, whichever OpenPI module
the program imports first, and the program's own `enable()` / `disable()` beats the environment.
Each scenario is a fresh interpreter (the start-up hook runs only at interpreter start); they are
all started together, so the module costs about their CPU time over the cores.
"""

import json
import subprocess
import sys

import pytest
from conftest import child_env

import openpi_prune
from openpi_prune.adapter import install
from openpi_prune.errors import OpenPIDependencyError, OpenPINotFoundError
from openpi_prune.pruner import methods

TIMEOUT = 600

# One scenario per interpreter, named by argv[1]; prints one JSON line. The first statement of
# each scenario that touches OpenPI is the import under test: nothing before it imports OpenPI.
CHILD = r"""
import json, sys, warnings

scenario, args = sys.argv[1], sys.argv[2:]
result = {}
HEAD = "prune_relevance_query"  # a parameter the default method (relevance) adds


def targets_wrapped():
    # Every target of every OpenPI module imported so far (the others are wrapped at their import).
    from openpi_prune.adapter import install, table

    wrapped = install.installed()
    imported = [t for t in table.CORE if t.module in sys.modules]
    return bool(imported) and all(wrapped.get(t.qualname) for t in imported)


def pruning_report():
    import jax
    from openpi_prune import telemetry

    jax.effects_barrier()
    reports = telemetry.recent()
    if not reports:
        return None
    report = reports[-1]
    return {"method": report.method, "kept": report.kept.tolist(), "candidates": report.candidates.tolist()}


def untrained_warnings(caught):
    from openpi_prune.errors import UntrainedParametersWarning

    return [str(w.message) for w in caught if issubclass(w.category, UntrainedParametersWarning)]


if scenario == "first-import":
    # Only the import: is everything patched, and is the module the program asked for whole?
    import importlib

    module = importlib.import_module(args[0])
    import openpi_prune

    result["enabled"] = openpi_prune.is_enabled()
    result["wrapped"] = targets_wrapped()
    result["attribute"] = hasattr(module, args[1])

elif scenario == "serve-load":
    # What create_trained_policy does, spelled out: config first, Pi0 only inside load's create.
    import openpi.training.config  # noqa: F401
    from openpi.models import model as _model
    import openpi_prune

    result["enabled_at_import"] = openpi_prune.is_enabled()
    import jax
    import numpy as np
    from openpi_prune.tools import small

    cfg = small.config(pi05=True)
    params = _model.restore_params(args[0] + "/params")
    result["checkpoint_has_head"] = HEAD in params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with small.siglip_variant("mu/14"):
            model = cfg.load(params)
    result["pi0_imported"] = "openpi.models.pi0" in sys.modules
    result["untrained_warnings"] = untrained_warnings(caught)
    result["has_head"] = hasattr(model, HEAD)
    actions = model.sample_actions(jax.random.key(0), small.observation(cfg), num_steps=1)
    result["finite"] = bool(np.isfinite(np.asarray(actions)).all())
    result["report"] = pruning_report()

elif scenario == "serve-policy":
    # OpenPI's own serving entry point, imported first, on a checkpoint folder (params/ + assets/).
    from openpi.policies import policy_config
    import openpi_prune

    result["enabled_at_import"] = openpi_prune.is_enabled()
    import jax
    import numpy as np
    from openpi import transforms
    from openpi.training import config as _config
    from openpi_prune.tools import small

    def no_transforms(model_config):
        return transforms.Group()

    cfg = small.config(pi05=True)
    train_config = _config.TrainConfig(
        name="plain",
        model=cfg,
        # No transforms but normalisation: OpenPI's would download a tokenizer; the test feeds tokens.
        data=_config.SimpleDataConfig(
            repo_id="plain",
            assets=_config.AssetsConfig(asset_id="plain"),
            data_transforms=no_transforms,
            model_transforms=no_transforms,
        ),
        assets_base_dir=args[0] + "/no-assets-here",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with small.siglip_variant("mu/14"):
            policy = policy_config.create_trained_policy(train_config, args[0], sample_kwargs={"num_steps": 1})
    result["untrained_warnings"] = untrained_warnings(caught)
    result["has_head"] = hasattr(policy._model, HEAD)
    example = jax.tree.map(lambda x: np.asarray(x[0]), small.observation(cfg).to_dict())
    outputs = policy.infer(example)
    result["actions_shape"] = list(outputs["actions"].shape)
    result["finite"] = bool(np.isfinite(outputs["actions"]).all())
    result["report"] = pruning_report()

elif scenario == "train":
    # OpenPI's training loader, imported first: shapes of the model, then the strict check.
    from openpi.training import weight_loaders
    import openpi_prune

    result["enabled_at_import"] = openpi_prune.is_enabled()
    import jax
    from flax import nnx
    from openpi.shared import array_typing as at
    from openpi_prune.tools import small

    cfg = small.config(pi05=True)
    with small.siglip_variant("mu/14"):
        params_shape = nnx.state(nnx.eval_shape(cfg.create, jax.random.key(0)), nnx.Param).to_pure_dict()
    result["model_has_head"] = HEAD in params_shape
    loaded = weight_loaders.CheckpointWeightLoader(args[0] + "/params").load(params_shape)
    at.check_pytree_equality(expected=params_shape, got=loaded, check_shapes=True, check_dtypes=True)
    result["checked"] = True
    result["head_from_model"] = isinstance(loaded[HEAD], jax.ShapeDtypeStruct)

elif scenario == "code-beats-env":
    import openpi_prune

    returned = openpi_prune.enable(method="language_only", mode="masked")
    result["returned"] = [returned.method, returned.mode]
    import openpi.models.pi0  # noqa: F401

    settings = openpi_prune.current_settings()
    result["after_import"] = [settings.method, settings.mode]
    result["wrapped"] = targets_wrapped()

elif scenario == "disabled":
    import openpi_prune

    result["pending"] = repr(openpi_prune.current_settings())
    with openpi_prune.disabled():
        import openpi.models.pi0  # noqa: F401

        result["inside"] = [openpi_prune.is_enabled(), repr(openpi_prune.current_settings())]
    result["after"] = [openpi_prune.is_enabled(), repr(openpi_prune.current_settings()), targets_wrapped()]

elif scenario == "unset":
    import openpi_prune

    # The start-up file (tiny: os and sys) is there to add the pruned configs; nothing heavy is.
    result["loaded_by_openpi_prune"] = sorted(m for m in ("jax", "wrapt", "openpi", "openpi_prune.configs") if m in sys.modules)
    import inspect
    import openpi.training.config  # noqa: F401
    from openpi.models import pi0

    result["enabled"] = openpi_prune.is_enabled()
    result["settings"] = openpi_prune.current_settings()
    result["embed_prefix"] = type(inspect.getattr_static(pi0.Pi0, "embed_prefix")).__name__

elif scenario == "missing-dependency":
    # As on a machine without OpenPI's own test tools: openpi.models.model imports pytest.
    sys.modules["pytest"] = None
    for attempt in ("import", "enable"):
        try:
            if attempt == "import":
                import openpi.training.config  # noqa: F401
            else:
                import openpi_prune

                openpi_prune.enable()
            result[attempt] = None
        except Exception as error:
            result[attempt] = [type(error).__name__, str(error)]
    # Once the module is back, OpenPI imports cleanly (no half-imported remains) and can be patched.
    del sys.modules["pytest"]
    import openpi.models.pi0  # noqa: F401

    result["recovered"] = openpi_prune.enable() is not None and targets_wrapped()

elif scenario == "unknown-method":
    # Every attempt to import OpenPI fails the same way; none runs it unpatched.
    for attempt in ("first", "second"):
        try:
            import openpi.models.pi0  # noqa: F401

            result[attempt] = None
        except Exception as error:
            result[attempt] = [type(error).__name__, str(error)]
    import openpi_prune

    result["enabled"] = openpi_prune.is_enabled()

print(json.dumps(result))
"""


class Children:
    """Interpreters started together, each read when a test asks for it."""

    def __init__(self):
        self._procs: dict[str, subprocess.Popen] = {}
        self._results: dict[str, dict] = {}

    def start(self, name: str, *args: str, **env: str) -> None:
        self._procs[name] = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            env=child_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, name: str) -> dict:
        if name not in self._results:
            proc = self._procs[name]
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out}\n{err}"
            self._results[name] = json.loads(out.strip().splitlines()[-1])
        return self._results[name]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# The first OpenPI module a program imports, and an attribute it has once fully initialised. The
# serving and training scenarios start with openpi.training.config, openpi.policies.policy_config
# and openpi.training.weight_loaders.
FIRST_IMPORTS = {
    "pi0": ("openpi.models.pi0", "Pi0"),
    "model": ("openpi.models.model", "restore_params"),
}


@pytest.fixture(scope="module")
def children(plain_checkpoint):
    kids = Children()
    # The checkpoint was made here, by a model without openpi-prune (the session fixture).
    folder = str(plain_checkpoint[2])
    kids.start("serve-load", "serve-load", folder, OPENPI_PRUNE="1")
    kids.start("serve-policy", "serve-policy", folder, OPENPI_PRUNE="1")
    kids.start("train", "train", folder, OPENPI_PRUNE="1")
    for name, (module, attribute) in FIRST_IMPORTS.items():
        kids.start(name, "first-import", module, attribute, OPENPI_PRUNE="1")
    kids.start("code-beats-env", "code-beats-env", OPENPI_PRUNE="method=scheme_b,capacity=96")
    kids.start("disabled", "disabled", OPENPI_PRUNE="method=scheme_b,capacity=96")
    kids.start("unset", "unset")
    kids.start("missing-dependency", "missing-dependency", OPENPI_PRUNE="1")
    kids.start("unknown-method", "unknown-method", OPENPI_PRUNE="method=nope")
    yield kids
    kids.close()


assert openpi_prune.PruneSettings().method == "relevance" and methods.RELEVANCE_QUERY in CHILD

ENV_SETTINGS = repr(openpi_prune.PruneSettings(method="scheme_b", capacity=96))


@pytest.mark.parametrize("name", sorted(FIRST_IMPORTS))
def test_patched_whichever_openpi_module_comes_first(children, name):
    result = children.result(name)
    assert result == {"enabled": True, "wrapped": True, "attribute": True}, FIRST_IMPORTS[name]


def test_serving_load_after_importing_the_config_first(children):
    # The model's Pi0 is imported lazily inside `cfg.load`: it is patched as it is imported.
    result = children.result("serve-load")
    assert result["enabled_at_import"] and result["pi0_imported"]
    assert not result["checkpoint_has_head"]
    assert len(result["untrained_warnings"]) == 1 and methods.RELEVANCE_QUERY in result["untrained_warnings"][0]
    assert result["has_head"] and result["finite"]
    report = result["report"]
    assert report is not None, "sample_actions reported no pruned prefix"
    assert report["method"] == "relevance"  # the default
    assert report["candidates"] == [768] and 0 < report["kept"][0] < 768


def test_create_trained_policy_serves_a_plain_checkpoint(children):
    result = children.result("serve-policy")
    assert result["enabled_at_import"]
    assert len(result["untrained_warnings"]) == 1
    assert result["has_head"]
    assert result["actions_shape"] == [10, 32] and result["finite"]
    report = result["report"]
    assert report is not None and report["candidates"] == [768] and 0 < report["kept"][0] < 768


def test_training_weight_loader_imported_first(children):
    result = children.result("train")
    assert result == {
        "enabled_at_import": True,
        "model_has_head": True,
        "checked": True,
        "head_from_model": True,
    }


def test_code_beats_the_environment(children):
    result = children.result("code-beats-env")
    # enable() returns what is in force, and OpenPI's import does not replace it with OPENPI_PRUNE's.
    assert result == {
        "returned": ["language_only", "masked"],
        "after_import": ["language_only", "masked"],
        "wrapped": True,
    }


def test_disabled_around_the_first_openpi_import(children):
    result = children.result("disabled")
    assert result["pending"] == ENV_SETTINGS  # reported before OpenPI's import, so it can be restored
    assert result["inside"] == [False, "None"]
    assert result["after"] == [True, ENV_SETTINGS, True]


def test_unset_imports_nothing_heavy_and_patches_nothing(children):
    result = children.result("unset")
    assert result == {"loaded_by_openpi_prune": [], "enabled": False, "settings": None, "embed_prefix": "function"}


def test_missing_openpi_dependency_is_named(children):
    result = children.result("missing-dependency")
    # Importing OpenPI meets OpenPI's own error (openpi-prune imports nothing then); enable(),
    # which imports what it patches, names the module and the fix.
    kind, message = result["import"]
    assert kind == "ModuleNotFoundError" and "pytest" in message
    kind, message = result["enable"]
    assert kind == "OpenPIDependencyError"
    assert "'pytest'" in message and "pip install pytest" in message
    assert result["recovered"]


def _raising(error):
    def import_module(name):
        raise error

    return import_module


def test_dependency_error_names_the_module(monkeypatch):
    error = ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")
    monkeypatch.setattr(install.importlib, "import_module", _raising(error))
    with pytest.raises(OpenPIDependencyError, match=r"needs the module 'sentencepiece'.*pip install sentencepiece"):
        install.import_openpi()


@pytest.mark.parametrize("missing", ["openpi", "openpi.training.weight_loaders"])
def test_missing_openpi_is_not_found(monkeypatch, missing):
    error = ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    monkeypatch.setattr(install.importlib, "import_module", _raising(error))
    with pytest.raises(OpenPINotFoundError, match="OpenPI not found") as raised:
        install.import_openpi()
    assert not isinstance(raised.value, OpenPIDependencyError)


def test_an_unknown_method_fails_every_import_of_openpi(children):
    result = children.result("unknown-method")
    for attempt in ("first", "second"):
        assert result[attempt] is not None, f"the {attempt} import ran OpenPI unpatched"
        name, message = result[attempt]
        assert name == "SettingsError" and "unknown pruning method 'nope'" in message, result[attempt]
    assert result["enabled"] is False
