"""openpi-prune as a user gets it: the wheel in a fresh venv, its start-up hook, a third-party plugin.

Everything runs in subprocesses of a fresh venv that holds only the two wheels built here; OpenPI
and its JAX stack come from the dev venv through a plain path `.pth` line (no reinstall). The wheels
and the venv are made once per module, and all the subprocesses (each imports OpenPI, ~7 s of CPU)
are started together, so the module takes about their CPU time over the cores.
"""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SRC = Path(__file__).resolve().parent / "thirdparty_plugin"
STARTUP_FILES = ("_openpi_prune_startup.py", "openpi-prune-startup.pth", "openpi-prune-startup.start")
TIMEOUT = 600

# Builds two wheels and a venv and starts nine interpreters: skipped by -m "not slow".
pytestmark = pytest.mark.slow

# Prints, as JSON, what the start-up hook did in this interpreter. argv: actions, see below.
PROBE = r'''
import inspect, json, sys

actions = sys.argv[1:]
result = {"preloaded": sorted(m for m in ("_openpi_prune_startup", "openpi_prune", "wrapt") if m in sys.modules)}


def wrappers():
    """How many openpi-prune wrappers sit on each patched attribute, over the whole chain."""
    from openpi.models import pi0

    counts = {}
    methods = ("__init__", "embed_prefix", "compute_loss", "sample_actions")
    for owner, name in [(pi0, "make_attn_mask")] + [(pi0.Pi0, n) for n in methods]:
        obj, count = inspect.getattr_static(owner, name), 0
        for _ in range(50):
            count += type(obj).__name__ == "PruneFunctionWrapper"
            obj = getattr(obj, "__wrapped__", None)
            if obj is None:
                break
        counts[name] = count
    return counts


if "start-twice-first" in actions:
    import _openpi_prune_startup
    _openpi_prune_startup.start()
    _openpi_prune_startup.start()

try:
    from openpi.models import pi0
except Exception as error:  # a bad OPENPI_PRUNE: every import fails the same way
    result["import_errors"] = [f"{type(error).__name__}: {error}"]
    try:
        from openpi.models import pi0
    except Exception as again:
        result["import_errors"].append(f"{type(again).__name__}: {again}")
    pi0 = None

if pi0 is not None:
    result["embed_prefix"] = type(inspect.getattr_static(pi0.Pi0, "embed_prefix")).__name__
    result["imported"] = "openpi_prune" in sys.modules
    result["wrappers"] = wrappers()
    if result["imported"]:
        result["enabled"] = sys.modules["openpi_prune"].is_enabled()
    if "enable-again" in actions:
        import openpi_prune
        openpi_prune.enable()
        result["wrappers_after_enable"] = wrappers()
    if "start-twice-late" in actions:
        import _openpi_prune_startup
        _openpi_prune_startup.start()
        _openpi_prune_startup.start()
        result["wrappers_after_late_start"] = wrappers()

import _openpi_prune_startup, openpi_prune
result["files"] = [openpi_prune.__file__, _openpi_prune_startup.__file__]
print(json.dumps(result))
'''

# Runs a small real pi0.5 with the plugin's method chosen by OPENPI_PRUNE.
PLUGIN_RUN = r"""
import json, os, sys
import jax
import numpy as np
import openpi_prune
import openpi_prune_every_other
from openpi_prune.pruner import plugins
from openpi_prune.tools import small
from openpi_prune import telemetry

cfg = small.config(pi05=True)
model = small.create(cfg)
obs = small.observation(cfg, batch_size=1)
assert openpi_prune.is_enabled(), "OPENPI_PRUNE did not enable openpi-prune"
log = os.environ["EVERY_OTHER_LOG"]
before = (list(openpi_prune_every_other.REPORTS), os.path.exists(log))
actions = model.sample_actions(jax.random.key(0), obs, num_steps=1)
jax.effects_barrier()
telemetry.flush()  # the plugin's report hook runs on the telemetry thread
kept_mask = telemetry.recent()[-1].values["kept_mask"]
print(json.dumps({
    "settings": repr(openpi_prune.current_settings()),
    "before": before,
    "reports": openpi_prune_every_other.REPORTS,
    "log": open(log).read().splitlines(),
    "kept_even_patches": bool(np.array_equal(kept_mask[0], np.arange(kept_mask.shape[1]) % 2 == 0)),
    "actions_shape": list(actions.shape),
    "finite": bool(np.isfinite(np.asarray(actions)).all()),
    "distributions": plugins.plugin_distributions(),
}))
"""

# Enabling the plugin's method while the plugin is blocked: through OPENPI_PRUNE at OpenPI's import
# ("import" in argv) or through `enable()` in code.
ENABLE_BLOCKED = r"""
import json, sys
import openpi_prune

try:
    if "import" in sys.argv[1:]:
        import openpi.models.pi0
    else:
        openpi_prune.enable(method="every_other", mode="masked")
    error = None
except Exception as e:
    error = [type(e).__name__, str(e)]
print(json.dumps({"error": error, "enabled": openpi_prune.is_enabled(),
                  "plugin_loaded": "openpi_prune_every_other" in sys.modules}))
"""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _clean_env(**changes) -> dict[str, str]:
    """The test's environment without anything that would steer openpi-prune or the imports."""
    return child_env(drop=("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "EVERY_OTHER_LOG"), **changes)


def _check(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


class Jobs:
    """Subprocesses started together and awaited one by one: each mostly imports OpenPI on one core."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self._procs: dict[str, subprocess.Popen] = {}
        self._done: dict[str, subprocess.CompletedProcess] = {}

    def start(self, name: str, cmd: list, env: dict[str, str]) -> None:
        self._procs[name] = subprocess.Popen(
            cmd, env=env, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def result(self, name: str) -> subprocess.CompletedProcess:
        if name not in self._done:
            proc = self._procs[name]
            out, err = proc.communicate(timeout=TIMEOUT)
            self._done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self._done[name]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


class Install:
    def __init__(self, root: Path):
        self.root = root
        self.wheels = root / "dist"
        self.venv = root / "fresh"
        self.python = _python(self.venv)
        self.work = root / "work"  # cwd of the subprocesses: not the repo, which would shadow the wheel
        self.work.mkdir()
        self.site = None
        # The dev venv's site-packages, where OpenPI and JAX are.
        self.dev_sites = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))

    def script(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Install:
    """Both wheels built once and installed (--no-deps) into a fresh venv that borrows the dev venv's packages."""
    inst = Install(tmp_path_factory.mktemp("install"))
    build_env = _clean_env()
    if importlib.util.find_spec("hatchling") is None:
        # `--no-isolation` needs the build backend; keep it out of the dev venv, beside the build.
        backend = inst.root / "hatchling"
        _check([sys.executable, "-m", "pip", "install", "-q", "--target", backend, "hatchling>=1.26"])
        build_env["PYTHONPATH"] = str(backend)
    for source in (REPO, PLUGIN_SRC):
        _check(
            [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", inst.wheels, source],
            env=build_env,
        )

    _check([sys.executable, "-m", "venv", "--without-pip", inst.venv])
    purelib = _check([inst.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    inst.site = Path(purelib.stdout.strip())
    # A path line: site adds the dev venv's directory but runs none of its .pth files (so neither its
    # editable openpi_prune nor its start-up hook). "00-" sorts before openpi-prune-startup.pth, which
    # needs wrapt from there.
    (inst.site / "00-openpi-dev-site.pth").write_text("".join(f"{p}\n" for p in inst.dev_sites))
    # --ignore-installed: pip sees the dev venv's editable openpi-prune and must leave it alone.
    _check(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            inst.python,
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            *sorted(inst.wheels.glob("*.whl")),
        ],
        env=_clean_env(),
    )
    return inst


def test_wheel_has_startup_files_at_its_root(install):
    (wheel,) = install.wheels.glob("openpi_prune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(STARTUP_FILES) <= names
    assert "openpi_prune/__init__.py" in names
    for name in STARTUP_FILES:
        assert (install.site / name).is_file(), f"{name} was not installed at the top of site-packages"


PROBES = ("unset", "off", "on", "malformed", "no-site")


@pytest.fixture(scope="module")
def jobs(install):
    """Every interpreter the tests look at, started at once (the module's runtime is their CPU time / cores)."""
    py = str(install.python)
    probe = install.script("probe.py", PROBE)
    run = install.script("plugin_run.py", PLUGIN_RUN)
    blocked = install.script("enable_blocked.py", ENABLE_BLOCKED)
    chosen = "method=every_other,mode=masked"
    jobs = Jobs(install.work)
    # The start-up hook, per way of starting Python.
    jobs.start("unset", [py, probe], _clean_env())
    jobs.start("off", [py, probe], _clean_env(OPENPI_PRUNE="0"))
    jobs.start("on", [py, probe, "start-twice-first", "enable-again"], _clean_env(OPENPI_PRUNE="1"))
    jobs.start("malformed", [py, probe], _clean_env(OPENPI_PRUNE="capacity=abc"))
    # Without site nothing puts the packages on sys.path: PYTHONPATH does, and runs no .pth file.
    no_site = _clean_env(OPENPI_PRUNE="1", PYTHONPATH=os.pathsep.join([str(install.site), *install.dev_sites]))
    jobs.start("no-site", [py, "-S", probe, "start-twice-late"], no_site)
    # The third-party plugin: used, then blocked or not allowed.
    log = str(install.work / "every_other.log")
    jobs.start("plugin", [py, run], _clean_env(OPENPI_PRUNE=chosen, EVERY_OTHER_LOG=log))
    block = _clean_env(OPENPI_PRUNE=chosen, OPENPI_PRUNE_DISABLE_PLUGINS="every_other")
    jobs.start("blocked", [py, blocked, "import"], block)
    jobs.start("not-allowed", [py, blocked], _clean_env(OPENPI_PRUNE_PLUGINS="somethingelse"))
    # Wide enough that rich's tables don't wrap the names.
    jobs.start("doctor", [install.venv / "bin" / "openpi-prune", "doctor"], _clean_env(COLUMNS="200"))
    yield jobs
    jobs.close()


def test_fresh_venv_imports_openpi_prune_from_the_wheel(install, jobs):
    for name in PROBES:
        files = [Path(f) for f in _json(jobs.result(name))["files"]]
        assert all(f.is_relative_to(install.venv) for f in files), f"{name}: imported {files}"


@pytest.mark.parametrize("case", ["unset", "off"])
def test_off_imports_nothing_and_patches_nothing(jobs, case):
    result = _json(jobs.result(case))
    assert result["embed_prefix"] == "function"
    assert not result["imported"], "openpi_prune was imported at start-up although OPENPI_PRUNE is off"
    assert "openpi_prune" not in result["preloaded"] and "wrapt" not in result["preloaded"]
    assert jobs.result(case).stderr == ""


def test_on_patches_at_openpi_import(jobs):
    result = _json(jobs.result("on"))
    # The start-up hook imported openpi_prune and wrapt only; OpenPI itself is left to the user.
    assert result["preloaded"] == ["_openpi_prune_startup", "openpi_prune", "wrapt"]
    assert result["embed_prefix"] == "PruneFunctionWrapper"
    assert result["enabled"] is True
    assert jobs.result("on").stderr == ""


def test_malformed_value_fails_every_openpi_import(jobs):
    result = _json(jobs.result("malformed"))
    errors = result["import_errors"]
    assert len(errors) == 2 and errors[0] == errors[1]
    assert errors[0].startswith("SettingsError: OPENPI_PRUNE='capacity=abc': capacity must be an integer; got 'abc'")


def test_no_site_flag_skips_startup(jobs):
    result = _json(jobs.result("no-site"))
    assert result["preloaded"] == []
    assert not result["imported"]
    assert result["embed_prefix"] == "function"


def test_startup_is_idempotent(jobs):
    # start() again after site ran it, and enable() on top: still one wrapper on every target.
    on = _json(jobs.result("on"))
    assert set(on["wrappers"].values()) == {1}, on["wrappers"]
    assert set(on["wrappers_after_enable"].values()) == {1}, on["wrappers_after_enable"]
    # start() twice after OpenPI was imported (site skipped): the first call patches at once, once.
    late = _json(jobs.result("no-site"))
    assert set(late["wrappers"].values()) == {0}
    assert set(late["wrappers_after_late_start"].values()) == {1}, late["wrappers_after_late_start"]


def test_third_party_plugin_prunes_inside_sample_actions(jobs):
    result = _json(jobs.result("plugin"))
    assert "method='every_other'" in result["settings"] and "mode='masked'" in result["settings"]
    # Nothing reported while creating the model; one report from the one prefix sample_actions built.
    assert result["before"] == [[], False]
    # 3 cameras x 256 patches, every other one kept.
    assert result["reports"] == [[384]]
    assert result["log"] == ["every_other masked 384"]
    assert result["kept_even_patches"]
    assert result["actions_shape"] == [1, 10, 32] and result["finite"]
    assert ["every_other", "openpi-prune-every-other 0.1.0"] in result["distributions"]


@pytest.mark.parametrize("case", ["blocked", "not-allowed"])
def test_blocked_plugin_method_is_unknown(jobs, case):
    result = _json(jobs.result(case))
    assert result["error"] is not None, "enabling a blocked plugin's method succeeded"
    kind, message = result["error"]
    assert kind == "SettingsError"
    assert "unknown pruning method 'every_other'" in message
    assert "OPENPI_PRUNE_PLUGINS" in message and "OPENPI_PRUNE_DISABLE_PLUGINS" in message
    assert not result["enabled"]
    assert not result["plugin_loaded"], "a blocked plugin was imported"


def test_doctor_lists_the_plugin(jobs):
    done = jobs.result("doctor")
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "openpi-prune-every-other 0.1.0" in done.stdout and "every_other" in done.stdout
