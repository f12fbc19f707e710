"""Threads, and faults inside model calls: no call runs half patched, the process stays usable."""

import inspect
import textwrap
import threading

import jax
import numpy as np
import pytest
from conftest import run_child
from flax import nnx

import openpi_prune
from openpi_prune import PruneError, hookspecs, telemetry
from openpi_prune.adapter import install, table
from openpi_prune.tools import small


def _attributes() -> dict:
    install.import_openpi()
    return {t.qualname: inspect.getattr_static(t.owner_object(), t.name) for t in table.CORE}


def _in_thread(function, timeout: float = 300):
    """Run `function` in a thread; its result, or the exception it raised. Fails if it hangs."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} did not return within {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_enable_and_disable_from_threads_while_models_sample(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    noise = jax.random.normal(jax.random.key(5), (1, cfg.action_horizon, cfg.action_dim))

    def sample(model=model):  # eager: every wrapper runs in every call
        return np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise))

    before = _attributes()
    upstream = sample()
    with openpi_prune.enabled(method="language_only", telemetry=False):
        pruned = sample()
    assert np.abs(pruned - upstream).max() > 1e-3  # the two can be told apart

    results, done = [], threading.Event()

    def sampler(own):  # one model object per thread: flax's eager modules are not shared safely
        for _ in range(3):
            results.append(sample(own))

    def toggler():
        while not done.is_set():
            openpi_prune.enable(method="language_only", telemetry=False)
            done.wait(0.05)
            openpi_prune.disable()
            done.wait(0.05)

    samplers = [threading.Thread(target=sampler, args=(nnx.clone(model),)) for _ in range(2)]
    switch = threading.Thread(target=toggler)
    for thread in (*samplers, switch):
        thread.start()
    for thread in samplers:
        thread.join(600)
    done.set()
    switch.join(60)
    assert len(results) == 6
    # Each call ran wholly pruned or wholly upstream: a call that met half a change (a pruned prefix
    # at renumbered positions, say) would match neither.
    for actions in results:
        assert np.allclose(actions, pruned, atol=1e-5) or np.allclose(actions, upstream, atol=1e-5)
    openpi_prune.disable()
    assert all(now is before[name] for name, now in _attributes().items())


def test_a_model_built_in_one_thread_is_used_in_another(pi05):
    cfg, _ = pi05
    with openpi_prune.enabled(method="relevance", telemetry=False):
        model = _in_thread(lambda: small.create(cfg, seed=2))
        with telemetry.collect() as reports:
            actions = model.sample_actions(jax.random.key(0), small.observation(cfg), num_steps=1)
    assert np.isfinite(np.asarray(actions)).all()
    assert int(reports[0]["kept"][0]) == int(np.ceil(0.2 * 768))


RACE = textwrap.dedent(
    """
    import importlib, inspect, json, threading
    import jax, flax.nnx, flax.linen  # what OpenPI imports first; OpenPI itself not yet
    barrier = threading.Barrier(4)
    errors = []
    def load(name):
        barrier.wait()
        try:
            importlib.import_module(name)
        except Exception as error:
            errors.append(repr(error))
    names = ["openpi.models.pi0", "openpi.models.gemma", "openpi.models.model", "openpi.training.weight_loaders"]
    threads = [threading.Thread(target=load, args=(name,)) for name in names]
    for t in threads: t.start()
    for t in threads: t.join()
    import time
    import openpi_prune
    from openpi_prune.adapter import install, pytorch, table
    # A module another thread was importing when the hook was set is wrapped once that import ends.
    deadline = time.time() + 60
    while (len(install.installed()) < len(table.CORE) or not pytorch.ACTIVE) and time.time() < deadline:
        time.sleep(0.01)
    wrappers = [inspect.getattr_static(t.owner_object(), t.name) for t in table.CORE]
    print(json.dumps({
        "errors": errors,
        "enabled": openpi_prune.is_enabled(),
        "installed": install.installed(),
        "pytorch": pytorch.ACTIVE,  # OpenPI's models.model imports its PyTorch model: patched too
        "wrapped_once": all(isinstance(w, install.PruneFunctionWrapper)
                            and not isinstance(w.__wrapped__, install.PruneFunctionWrapper) for w in wrappers),
    }))
    """
)


def test_the_start_up_hook_racing_imports_in_threads():
    result = run_child(RACE, OPENPI_PRUNE="method=language_only")
    assert result["errors"] == [] and result["enabled"] and result["wrapped_once"] and result["pytorch"]
    assert len(result["installed"]) == len(table.CORE) and all(result["installed"].values())


class _Plugin:
    """A third-party method whose score does what `score` says, and a report hook that waits."""

    def __init__(self, score=None):
        self.score = score
        self.release = threading.Event()
        self.reports = []

    @hookspecs.hookimpl
    def openpi_prune_methods(self):
        return ["faulty"]

    @hookspecs.hookimpl
    def openpi_prune_task_context(self, text_tokens, text_mask, settings):
        return (text_tokens, text_mask) if settings.method == "faulty" else None

    @hookspecs.hookimpl
    def openpi_prune_score(self, image_tokens, candidate_mask, settings):
        return self.score() if settings.method == "faulty" else None

    @hookspecs.hookimpl
    def openpi_prune_report(self, telemetry):
        self.release.wait()
        self.reports.append(telemetry)


@pytest.fixture
def plugin(register_plugin):
    made = []

    def register(**kwargs):
        made.append(register_plugin(_Plugin(**kwargs), name="faulty"))
        return made[-1]

    yield register
    for p in made:
        p.release.set()
    telemetry.flush(timeout=30)


def test_a_plugin_raising_inside_a_jitted_call_leaves_the_process_usable(pi05, plugin):
    cfg, model = pi05
    obs = small.observation(cfg)

    def fail():
        raise RuntimeError("faulty plugin")

    plugin(score=fail).release.set()
    openpi_prune.enable(method="faulty")
    wrapped = _attributes()
    sample = jax.jit(lambda o: model.sample_actions(jax.random.key(0), o, num_steps=1))
    with pytest.raises(RuntimeError, match="faulty plugin"):
        sample(obs)
    assert _attributes() == wrapped and all(install.installed().values())
    # No call is left counted as in flight: changing settings does not wait for it.
    _in_thread(lambda: openpi_prune.enable(method="language_only"), timeout=30)
    actions = jax.jit(lambda o: model.sample_actions(jax.random.key(0), o, num_steps=1))(obs)
    assert np.isfinite(np.asarray(actions)).all()
    _in_thread(openpi_prune.disable, timeout=30)


def test_changing_settings_from_inside_a_model_call_is_refused(pi05, plugin):
    cfg, model = pi05

    def switch():
        openpi_prune.enable(method="keep_all")

    plugin(score=switch).release.set()
    with openpi_prune.enabled(method="faulty"):
        with pytest.raises(PruneError, match="from inside a model call"):
            _in_thread(lambda: model.sample_actions(jax.random.key(0), small.observation(cfg), num_steps=1))
        assert openpi_prune.current_settings().method == "faulty"


def test_a_blocked_report_hook_does_not_stop_a_policy_from_serving(pi05, plugin):
    cfg, model = pi05
    blocked = plugin()
    sample = jax.jit(lambda o: model.sample_actions(jax.random.key(0), o, num_steps=1))
    with openpi_prune.enabled(method="language_only"):

        def serve():
            outputs = [sample(small.observation(cfg, seed=i)) for i in range(3)]
            jax.effects_barrier()  # the telemetry's host callbacks have run
            return outputs

        outputs = _in_thread(serve, timeout=300)  # returns although the hook waits
        assert all(np.isfinite(np.asarray(o)).all() for o in outputs)
        assert len(blocked.reports) == 0
        blocked.release.set()
        assert telemetry.flush(timeout=60)
    assert len(blocked.reports) == 3


def test_each_served_call_carries_its_own_figures_whatever_the_threads(relevance_model):
    """Four threads share one `Policy`; their observations have one or two live cameras, so a
    response carrying another call's figures shows in its live image tokens."""
    import concurrent.futures

    from openpi.policies import policy as _policy

    cfg, model = relevance_model

    def example(live_cameras: int) -> dict:
        masks = {name: [i < live_cameras] for i, name in enumerate(small.observation(cfg).images)}
        obs = small.observation(cfg, batch_size=1, camera_masks=masks)
        return jax.tree.map(lambda x: np.asarray(x[0]), obs.to_dict())

    examples = {1: example(1), 2: example(2)}
    with openpi_prune.enabled(method="relevance", warn_below=0):
        policy = _policy.Policy(model, sample_kwargs={"num_steps": 1})
        for live in examples:  # compiled once before the threads start
            policy.infer(examples[live])

        def serve(index: int):
            live = 1 + index % 2
            return live, policy.infer(examples[live])["pruning"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(serve, range(60)))
    per_camera = 256  # SigLIP on 224x224 images
    wrong = [(live, f) for live, f in responses if f["live_image_tokens"] != live * per_camera]
    assert not wrong, f"{len(wrong)} of {len(responses)} responses carried another call's figures: {wrong[:3]}"
    assert {int(np.count_nonzero(f["kept_per_camera"])) for _, f in responses} == {1, 2}
