"""Patching OpenPI with wrapt: checked first, all or nothing, and undone exactly.

This module knows OpenPI's code and nothing of the pruning math: each wrapper calls the original
and hands its result to `openpi_prune.prefix`, which asks the hooks what to do.
"""

import contextlib
import dataclasses
import functools
import gc
import importlib
import inspect
import logging
import sys
import threading
import warnings
from collections.abc import Callable

import wrapt

from openpi_prune.errors import IncompatibleOpenPIError, OpenPIDependencyError, OpenPINotFoundError, PruneError

logger = logging.getLogger("openpi_prune")

MODULE = "openpi.models.pi0"
MODULES = (MODULE, "openpi.models.gemma", "openpi.models.model", "openpi.training.weight_loaders")
# Offset folded into compute_loss's rng for the pruner's own noise: OpenPI splits the rng in three
# and never folds it, so this draws nothing OpenPI uses.
_PRUNER_RNG_FOLD = 0x5052554E


class TracedBeforeChangeWarning(UserWarning):
    """A model function was compiled before the patches changed; it keeps the old behaviour."""


class PruneFunctionWrapper(wrapt.FunctionWrapper):
    """Marks openpi-prune's wrappers, and keeps them on the path of `nnx_utils.module_jit`.

    OpenPI's `Policy` jits `meth.__func__` of a bound method; a plain wrapt bound wrapper answers
    `__func__` with the unwrapped function, which would skip the wrapper under every Policy.
    """


class _BoundPruneFunctionWrapper(wrapt.BoundFunctionWrapper):
    @property
    def __func__(self):
        parent = self._self_parent

        @functools.wraps(self.__wrapped__.__func__)
        def through_wrapper(instance, /, *args, **kwargs):
            return parent.__get__(instance, type(instance))(*args, **kwargs)

        return through_wrapper


PruneFunctionWrapper.__bound_function_wrapper__ = _BoundPruneFunctionWrapper


@dataclasses.dataclass(frozen=True)
class Target:
    """One attribute of OpenPI we wrap, and what must hold for the wrapper to be right."""

    owner: str  # "" for the module itself, else a class name in it
    name: str
    parameters: tuple[str, ...]
    # Statements (whitespace-insensitive) the wrapper relies on, in the order they must appear.
    source: tuple[str, ...] = ()
    module: str = MODULE

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.owner + '.' if self.owner else ''}{self.name}"

    @property
    def key(self) -> str:
        """The name its wrapper is registered under in `WRAPPERS`."""
        return f"{self.owner}.{self.name}" if self.owner else self.name


TARGETS = (
    Target("", "make_attn_mask", ("input_mask", "mask_ar")),
    Target("Pi0", "__init__", ("self", "config", "rngs")),
    Target(
        "Pi0",
        "embed_prefix",
        ("self", "obs"),
        # Output layout: every camera's tokens in `obs.images` order, then the prompt's.
        (
            "for name in obs.images:",
            "image_tokens, _ = self.PaliGemma.img(obs.images[name], train=False)",
            'tokenized_inputs = self.PaliGemma.llm(obs.tokenized_prompt, method="embed")',
            "tokens = jnp.concatenate(tokens, axis=1)",
        ),
    ),
    Target(
        "Pi0",
        "compute_loss",
        ("self", "rng", "observation", "actions", "train"),
        # The wrapper re-derives x_t and time from the rng exactly as these lines do.
        (
            "preprocess_rng, noise_rng, time_rng = jax.random.split(rng, 3)",
            "batch_shape = actions.shape[:-2]",
            "noise = jax.random.normal(noise_rng, actions.shape)",
            "time = jax.random.beta(time_rng, 1.5, 1, batch_shape) * 0.999 + 0.001",
            "time_expanded = time[..., None, None]",
            "x_t = time_expanded * noise + (1 - time_expanded) * actions",
            "prefix_tokens, prefix_mask, prefix_ar_mask = self.embed_prefix(observation)",
            "self.embed_suffix(observation, x_t, time)",
        ),
    ),
    Target(
        "Pi0",
        "sample_actions",
        ("self", "rng", "observation", "num_steps", "noise"),
        # The wrapper draws this same noise and passes it in, so the pruner sees what OpenPI uses.
        (
            "batch_size = observation.state.shape[0]",
            "if noise is None:",
            "noise = jax.random.normal(rng, (batch_size, self.action_horizon, self.action_dim))",
            "prefix_tokens, prefix_mask, prefix_ar_mask = self.embed_prefix(observation)",
        ),
    ),
    # OpenPI numbers tokens by `cumsum(input_mask)`, so a pruned prefix would renumber its kept
    # tokens; the wrapper hands PaliGemma the positions they had upstream.
    Target(
        "Module",
        "__call__",
        ("self", "embedded", "positions", "mask", "adarms_cond", "kv_cache", "deterministic"),
        ("self.layers(embedded, kv_cache, positions, mask, adarms_cond, deterministic)",),
        module="openpi.models.gemma",
    ),
    # Parameters a method adds (named `prune_*`) are absent from checkpoints made without it.
    Target("BaseModelConfig", "load", ("self", "params", "remove_extra_params"), module="openpi.models.model"),
    Target("CheckpointWeightLoader", "load", ("self", "params"), module="openpi.training.weight_loaders"),
)


# Not among TARGETS: OpenPI's serving module imports torch and its tokenizer (seconds), so it is
# patched only once a program imports it, and a mismatch there costs the figures, not the pruning.
SERVING = Target("Policy", "infer", ("self", "obs", "noise"), module="openpi.policies.policy")


def _squash(text: str) -> str:
    return "".join(text.split())


def import_openpi():
    """The module of `Pi0`, after importing every module a target lives in."""
    try:
        for name in reversed(MODULES):
            importlib.import_module(name)
        return sys.modules[MODULE]
    except ImportError as error:
        missing = error.name or ""
        if missing and missing != "openpi" and not missing.startswith("openpi."):
            # OpenPI is there, but something it imports is not.
            top = missing.partition(".")[0]
            raise OpenPIDependencyError(
                f"OpenPI is installed but cannot be imported: it needs the module {missing!r}, which is "
                f"missing ({error}). Install the package that provides it into this environment (usually "
                f"`pip install {top}`; openpi-prune's requirements-openpi.txt lists what OpenPI imports)."
            ) from error
        raise OpenPINotFoundError(
            f"OpenPI not found: cannot import {missing or MODULE} ({error}). openpi-prune patches an installed "
            "OpenPI: install upstream openpi (e.g. from its repository, or `pip install --no-deps "
            "rpent-openpi==0.2.2` plus its JAX dependencies) into this environment."
        ) from error


def _owner(target: Target):
    module = sys.modules[target.module]
    return getattr(module, target.owner) if target.owner else module


def _resolve(target: Target):
    owner = _owner(target)
    # A class's own attribute: renamed in OpenPI, an inherited one of the same name would be wrapped
    # in its place, and never run.
    if target.owner and target.name not in vars(owner):
        raise AttributeError(target.name)
    return owner, getattr(owner, target.name)


def check(targets: tuple[Target, ...] = TARGETS) -> list[str]:
    """What differs between the installed OpenPI and what the wrappers assume (empty: compatible)."""
    problems = []
    for target in targets:
        try:
            _, function = _resolve(target)
        except AttributeError:
            problems.append(f"{target.qualname} is missing")
            continue
        function = inspect.unwrap(function)
        try:
            parameters = tuple(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            parameters = ()
        if parameters != target.parameters:
            problems.append(
                f"{target.qualname} takes ({', '.join(parameters)}), expected ({', '.join(target.parameters)})"
            )
        if target.source:
            try:
                source = _squash(inspect.getsource(function))
            except (OSError, TypeError):
                problems.append(f"{target.qualname}: source unavailable, cannot check its statements")
                continue
            position = 0
            for statement in target.source:
                found = source.find(_squash(statement), position)
                if found < 0:
                    problems.append(f"{target.qualname} no longer has `{statement}` (in this order)")
                    break
                position = found
    return problems


@dataclasses.dataclass
class _State:
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    handles: dict[Target, object] = dataclasses.field(default_factory=dict)
    serving: object = None  # the wrapper on Policy.infer, once that module is imported
    traced: bool = False
    # Installed from OpenPI's import (`lazy`): the modules whose targets are wrapped when they are
    # imported, and what failed if one did not match (raised again at each of its imports).
    waiting: set = dataclasses.field(default_factory=set)
    failure: IncompatibleOpenPIError | None = None
    generation: int = 0  # a post-import hook of an earlier install does nothing


_state = _State()


class _InFlight:
    """Model calls through the wrappers, and changes of the patches or settings: a change waits for
    the calls in flight to end, and new calls wait for the change, so that no call runs half
    patched or with settings changed under it (under jit, a call is its tracing). Reentrant: a
    call's nested calls and a change's nested changes go straight through."""

    def __init__(self):
        self._cond = threading.Condition()
        self._calls = 0
        self._changer: int | None = None  # the thread changing things now
        self._depth = threading.local()

    @contextlib.contextmanager
    def call(self):
        """Yields True in the outermost call of this thread."""
        depth = getattr(self._depth, "calls", 0)
        outermost = depth == 0 and self._changer != threading.get_ident()
        if outermost:
            with self._cond:
                self._cond.wait_for(lambda: self._changer is None)
                self._calls += 1
        self._depth.calls = depth + 1
        try:
            yield outermost
        finally:
            self._depth.calls = depth
            if outermost:
                with self._cond:
                    self._calls -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def change(self):
        me = threading.get_ident()
        if self._changer == me:
            yield
            return
        if getattr(self._depth, "calls", 0):
            raise PruneError(
                "openpi-prune cannot be enabled, disabled or re-configured from inside a model call "
                "(a hook or plugin tried to): it would wait for that call to end. Do it between calls."
            )
        with self._cond:
            self._cond.wait_for(lambda: self._changer is None)
            self._changer = me
            self._cond.wait_for(lambda: self._calls == 0)
        try:
            yield
        finally:
            with self._cond:
                self._changer = None
                self._cond.notify_all()


IN_FLIGHT = _InFlight()


def exclusive():
    """Hold while patching, unpatching or changing settings (waits for model calls in flight)."""
    return IN_FLIGHT.change()


# The methods that run the others: a call of one that began unpatched stays unpatched throughout.
_ENTRY_POINTS = ("Pi0.compute_loss", "Pi0.sample_actions")


def _inside_unpatched_entry_point() -> bool:
    """Whether this thread is inside OpenPI's compute_loss / sample_actions entered without our
    wrapper (looked up before `enable()`): its inner calls must not be pruned halfway."""
    codes = set()
    for target in TARGETS:
        if target.key in _ENTRY_POINTS and target.module in sys.modules:
            codes.add(inspect.unwrap(getattr(_owner(target), target.name)).__code__)
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _in_flight(wrapper):
    @functools.wraps(wrapper)
    def guarded(wrapped, instance, args, kwargs):
        with IN_FLIGHT.call() as outermost:
            if outermost and (not _state.handles or _inside_unpatched_entry_point()):
                # Unpatched after this call looked the method up, or inside a call that began
                # unpatched: OpenPI's own, as a whole.
                return wrapped(*args, **kwargs)
            return wrapper(wrapped, instance, args, kwargs)

    return guarded


def is_installed() -> bool:
    """Whether OpenPI is patched (or, installed from OpenPI's import, will be as it is imported)."""
    return bool(_state.handles or _state.waiting) and _state.failure is None


def installed() -> dict[str, bool]:
    """Each target's qualified name -> whether our wrapper is still in place on it."""
    with _state.lock:
        if not _state.handles:
            return {}
        return {t.qualname: wrapt.is_wrapped_by(_static(t), h) for t, h in _state.handles.items()}


def _static(target: Target):
    """The attribute as stored (a class attribute, not the bound wrapper its descriptor makes)."""
    return inspect.getattr_static(_owner(target), target.name)


def note_patches_changed(what: str, stacklevel: int = 3) -> None:
    """Warn if a wrapped model function was traced since the last change, then start afresh."""
    if _state.traced:
        warnings.warn(
            f"openpi-prune {what} after a pruned model function was jit-compiled; compiled functions "
            "keep the behaviour they were traced with. Re-jit them (e.g. create the Policy or the "
            "train step anew) to pick up the change.",
            TracedBeforeChangeWarning,
            stacklevel=stacklevel,
        )
    _state.traced = False


def compiled_model_functions() -> list[str]:
    """Names of jit-compiled functions in this process that call a `Pi0` method (as `Policy` makes)."""
    found = []
    for obj in gc.get_objects():
        if type(obj).__name__ != "PjitFunction" or not obj._cache_size():
            continue
        wrapped = getattr(obj, "__wrapped__", None)
        cells = [c.cell_contents for c in getattr(wrapped, "__closure__", None) or () if _cell_filled(c)]
        for candidate in (wrapped, *cells):
            name = getattr(getattr(candidate, "__func__", candidate), "__qualname__", "")
            if name.startswith("Pi0."):
                found.append(name)
                break
    return found


def _alone() -> bool:
    me = threading.current_thread()
    return all(t is me or t.name.startswith("openpi-prune") for t in threading.enumerate())


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def install(wrappers: dict[str, Callable], *, strict: bool = True, lazy: bool = False) -> bool:
    """Wrap every target with `wrappers[name]`, or none of them. Returns whether it patched.

    lazy (from OpenPI's import hook): wrap each module's targets as that module is imported.
    Importing the others from inside an import, as the eager way does, would hold one module's
    import lock while taking others', which deadlocks threads importing OpenPI at the same time.
    A module that does not match undoes the others' wrappers and fails its import (strict)."""
    if lazy:
        return _install_lazily(wrappers, strict)
    module = import_openpi()
    with _state.lock:
        if is_installed():
            return True
        problems = check()
        if problems:
            message = "the installed OpenPI does not match what openpi-prune patches:\n  " + "\n  ".join(problems)
            message += f"\n(OpenPI at {getattr(module, '__file__', '?')}.) Nothing was patched."
            if strict:
                raise IncompatibleOpenPIError(message + " Set strict=False to carry on unpruned.")
            logger.warning("%s Pruning is off.", message)
            return False
        # Walking the heap hands out objects other threads are still building (a tuple being
        # filled, which JAX then fails to resize): only while no other thread runs Python.
        late = compiled_model_functions() if _alone() else []
        if late:
            warnings.warn(
                f"openpi-prune was enabled after {', '.join(sorted(set(late)))} was jit-compiled; "
                "those compiled functions run unpruned. Enable it before creating the Policy or "
                "the train step (OPENPI_PRUNE=1 does so at start-up).",
                TracedBeforeChangeWarning,
                stacklevel=3,
            )
        _state.handles = _wrap(TARGETS, wrappers)
        _state.traced = False
    # Fires at once if OpenPI's serving module is imported already.
    wrapt.register_post_import_hook(_install_serving, SERVING.module)
    return True


def _install_lazily(wrappers: dict[str, Callable], strict: bool) -> bool:
    with _state.lock:
        if is_installed():
            return True
        _state.generation += 1
        _state.waiting, _state.failure = set(MODULES), None
        generation = _state.generation
    _registering.now = True
    try:
        for name in MODULES:  # each fires at once if its module is imported already
            wrapt.register_post_import_hook(functools.partial(_on_module, generation, wrappers, strict), name)
    finally:
        _registering.now = False
    wrapt.register_post_import_hook(_install_serving, SERVING.module)
    return True


_registering = threading.local()


def _on_module(generation: int, wrappers: dict[str, Callable], strict: bool, module) -> None:
    name = module.__name__
    if getattr(_registering, "now", False) and getattr(module.__spec__, "_initializing", False):
        # Fired as it was registered, on a module another thread is importing: wait for that
        # import in a thread that holds no import lock, then wrap.
        def when_imported():
            _on_module(generation, wrappers, strict, importlib.import_module(name))

        threading.Thread(target=when_imported, name=f"openpi-prune: {name}", daemon=True).start()
        return
    with _state.lock:
        if generation != _state.generation:
            return  # uninstalled, or installed anew, since
        if _state.failure is not None:
            raise _state.failure
        if name not in _state.waiting:
            return
        targets = tuple(t for t in TARGETS if t.module == name)
        problems = check(targets)
        if problems:
            _unwrap(_state.handles)
            _state.handles = {}
            message = "the installed OpenPI does not match what openpi-prune patches:\n  " + "\n  ".join(problems)
            message += f"\n(OpenPI at {getattr(module, '__file__', '?')}.) Nothing was patched."
            if not strict:
                _state.waiting = set()
                logger.warning("%s Pruning is off.", message)
                return
            _state.failure = IncompatibleOpenPIError(message + " Set strict=False to carry on unpruned.")
            # Python forgets the failed module; importing it again must fail the same way.
            wrapt.register_post_import_hook(functools.partial(_on_module, generation, wrappers, strict), name)
            raise _state.failure
        _state.handles.update(_wrap(targets, wrappers))
        _state.waiting.discard(name)


def _wrap(targets, wrappers: dict[str, Callable]) -> dict:
    """Wrap every one of `targets`, or (if one fails) none of them; their handles."""
    done = {}
    try:
        for target in targets:
            done[target] = wrapt.wrap_object(
                _owner(target), target.name, PruneFunctionWrapper, (_in_flight(wrappers[target.key]),)
            )
    except BaseException:
        _unwrap(done)
        raise
    return done


def _unwrap(handles: dict) -> None:
    for target, handle in handles.items():
        wrapt.unwrap_object(_owner(target), target.name, handle, missing_ok=True)


def _install_serving(module) -> None:
    with _state.lock:
        if not _state.handles or _state.serving is not None:
            return
        problems = check((SERVING,))
        if problems:
            logger.warning("openpi-prune: no pruning figures in policy responses: %s", "; ".join(problems))
            return
        _state.serving = wrapt.wrap_object(
            _owner(SERVING), SERVING.name, PruneFunctionWrapper, (_in_flight(wrap_policy_infer),)
        )


def uninstall() -> bool:
    """Remove exactly our wrappers (others' stay). Returns whether anything was removed."""
    with _state.lock:
        if not (_state.handles or _state.waiting or _state.failure):
            return False
        note_patches_changed("was disabled", stacklevel=4)
        _unwrap(_state.handles)
        _state.handles, _state.waiting, _state.failure = {}, set(), None
        _state.generation += 1
        if _state.serving is not None:
            wrapt.unwrap_object(_owner(SERVING), SERVING.name, _state.serving, missing_ok=True)
            _state.serving = None
        return True


def note_call(*values) -> None:
    """Remember that a wrapper ran under a JAX trace (for `note_patches_changed`)."""
    if not _state.traced:
        import jax

        _state.traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


def _drifted(target: Target, problem: str) -> None:
    """OpenPI's `target` answered in a form its wrapper cannot use (checked at every call: a
    signature can match while the result changed). Strict: raise; else log, and the caller hands
    back OpenPI's own result untouched."""
    from openpi_prune import prefix

    message = f"the installed OpenPI's {target.qualname} {problem}, not what openpi-prune expects;"
    if prefix.active_settings().strict:
        raise IncompatibleOpenPIError(f"{message} nothing was pruned. Set strict=False to carry on unpruned.")
    logger.warning("%s this call runs unpruned.", message)


def _target(key: str) -> Target:
    return next(t for t in (*TARGETS, SERVING) if t.key == key)


# The wrappers: each calls the original and hands over to `openpi_prune.prefix`.


def _describe(value) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    shape = getattr(value, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"


def _bind(wrapped, args, kwargs):
    return inspect.signature(wrapped).bind(*args, **kwargs).arguments


def wrap_init(wrapped, instance, args, kwargs):
    from openpi_prune import prefix

    wrapped(*args, **kwargs)
    bound = _bind(wrapped, args, kwargs)
    prefix.init_model(instance, bound["config"], bound["rngs"])


def wrap_embed_prefix(wrapped, instance, args, kwargs):
    from openpi_prune import prefix

    observation = prefix.observation_for_prefix(_bind(wrapped, args, kwargs)["obs"])
    result = wrapped(observation)
    if not (isinstance(result, tuple) and len(result) == 3 and getattr(result[0], "ndim", None) == 3):
        _drifted(
            _target("Pi0.embed_prefix"), f"returned {_describe(result)} (expected tokens [b,s,d], input_mask, ar_mask)"
        )
        return result
    tokens, input_mask, ar_mask = result
    note_call(tokens)
    return prefix.prune(instance, observation, tokens, input_mask, ar_mask)


def wrap_make_attn_mask(wrapped, instance, args, kwargs):
    from openpi_prune import prefix

    attn_mask = wrapped(*args, **kwargs)
    if getattr(attn_mask, "ndim", None) != 3:
        _drifted(_target("make_attn_mask"), f"returned {_describe(attn_mask)} (expected a mask [b,q,k])")
        return attn_mask
    bound = _bind(wrapped, args, kwargs)
    return prefix.adjust_attn_mask(attn_mask, bound["input_mask"], bound["mask_ar"])


def wrap_compute_loss(wrapped, instance, args, kwargs):
    import jax

    from openpi_prune import prefix

    if prefix.probing():  # a saliency pass around this call wants the unpruned loss
        return wrapped(*args, **kwargs)
    bound = _bind(wrapped, args, kwargs)
    rng, actions = bound["rng"], bound["actions"]
    # The same x_t and time OpenPI's compute_loss draws (checked against its source at install).
    _, noise_rng, time_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_rng, actions.shape)
    time = jax.random.beta(time_rng, 1.5, 1, actions.shape[:-2]) * 0.999 + 0.001
    time_expanded = time[..., None, None]
    x_t = time_expanded * noise + (1 - time_expanded) * actions
    rng_for_pruner = jax.random.fold_in(rng, _PRUNER_RNG_FOLD)
    train = bool(bound.get("train", False))
    # A method that learns from the model's saliency gets it from the same call, unpruned.
    saliency = prefix.saliency(lambda: wrapped(*args, **kwargs)) if train and prefix.wants_saliency() else None
    extra_losses = []
    with prefix.noisy_actions(x_t, time, rng=rng_for_pruner, train=train, saliency=saliency, extra_losses=extra_losses):
        loss = wrapped(*args, **kwargs)
    if getattr(loss, "shape", ())[:1] != actions.shape[:1]:
        _drifted(_target("Pi0.compute_loss"), f"returned {_describe(loss)} (expected a loss per sample, [b, ...])")
        return loss
    for extra in extra_losses:  # per sample; OpenPI's loss is per sample and action step
        loss = loss + extra.reshape(extra.shape + (1,) * (loss.ndim - extra.ndim)).astype(loss.dtype)
    return loss


def wrap_sample_actions(wrapped, instance, args, kwargs):
    import jax
    import jax.numpy as jnp

    from openpi_prune import prefix

    bound = _bind(wrapped, args, kwargs)
    noise = bound.get("noise")
    if noise is None:
        batch_size = bound["observation"].state.shape[0]
        noise = jax.random.normal(bound["rng"], (batch_size, instance.action_horizon, instance.action_dim))
        kwargs = {**kwargs, "noise": noise}
    time = jnp.ones(noise.shape[:1], dtype=jnp.float32)
    with prefix.noisy_actions(noise, time, rng=None, train=False):
        return wrapped(*args, **kwargs)


def wrap_llm_call(wrapped, instance, args, kwargs):
    from openpi_prune import prefix

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    positions = prefix.upstream_positions(bound.arguments["embedded"], bound.arguments["positions"])
    if positions is None:
        return wrapped(*args, **kwargs)
    bound.arguments["positions"] = positions
    return wrapped(*bound.args, **bound.kwargs)


def wrap_policy_infer(wrapped, instance, args, kwargs):
    """`Policy.infer`: its compiled `sample_actions` gets the prompt cut to a bucket, and the response
    carries this call's pruning figures under "pruning"."""
    import jax

    from openpi_prune import prefix, telemetry

    sample = vars(instance).get("_sample_actions")
    if sample is not None and not isinstance(sample, _PromptBucketing):
        instance._sample_actions = _PromptBucketing(sample)
    before = telemetry.RECORDER.count
    outputs = wrapped(*args, **kwargs)
    if not isinstance(outputs, dict):
        _drifted(SERVING, f"returned {_describe(outputs)} (expected a dict of outputs)")
        return outputs
    jax.effects_barrier()  # the telemetry's host callback has run
    figures = prefix.serving_figures(telemetry.RECORDER.since(before))
    if figures is not None:
        outputs["pruning"] = figures
    return outputs


class _PromptBucketing:
    """A `Policy`'s compiled `sample_actions`, handed the observation with its prompt cut to a
    bucket (compact mode, while pruning is installed): a shorter prefix, one compile per bucket."""

    def __init__(self, sample):
        self.sample = sample

    def __call__(self, rng, observation, **kwargs):
        import jax

        from openpi_prune import prefix

        settings = prefix.active_settings()
        prompt = getattr(observation, "tokenized_prompt", None)
        if is_installed() and settings.mode == "compact" and isinstance(prompt, jax.Array):
            observation = prefix.bucket_prompt(observation, settings.prompt_buckets)
        return self.sample(rng, observation, **kwargs)


def wrap_config_load(wrapped, instance, args, kwargs):
    """`BaseModelConfig.load`: give a pi0 checkpoint made without this method its fresh parameters."""
    from openpi.models import pi0_config

    from openpi_prune import prefix

    if not isinstance(instance, pi0_config.Pi0Config):
        return wrapped(*args, **kwargs)
    bound = _bind(wrapped, args, kwargs)
    params = prefix.complete_params(instance, bound["params"])
    return wrapped(params, **{k: v for k, v in bound.items() if k != "params"})


def wrap_checkpoint_load(wrapped, instance, args, kwargs):
    """`CheckpointWeightLoader.load`: treat a method's parameters like LoRA's, kept from `params`."""
    from openpi_prune import prefix

    loaded = wrapped(*args, **kwargs)
    if not isinstance(loaded, dict):
        _drifted(_target("CheckpointWeightLoader.load"), f"returned {_describe(loaded)} (expected a dict of params)")
        return loaded
    return prefix.add_missing_from_reference(loaded, _bind(wrapped, args, kwargs)["params"])


WRAPPERS = {
    "make_attn_mask": wrap_make_attn_mask,
    "Pi0.__init__": wrap_init,
    "Pi0.embed_prefix": wrap_embed_prefix,
    "Pi0.compute_loss": wrap_compute_loss,
    "Pi0.sample_actions": wrap_sample_actions,
    "Module.__call__": wrap_llm_call,
    "BaseModelConfig.load": wrap_config_load,
    "CheckpointWeightLoader.load": wrap_checkpoint_load,
}
