"""Patching OpenPI with wrapt, from the table: checked first, all or nothing, and undone exactly.

Each wrapper runs inside a guard: it waits for a change of the patches in progress, runs OpenPI's
own function when the call began unpatched, and turns a wrapper's `Drifted` into an error (strict)
or OpenPI's own result.
"""

import contextlib
import functools
import gc
import importlib
import logging
import sys
import threading
import warnings

import wrapt

from openpi_prune import call, settings
from openpi_prune.adapter import inflight, pytorch, table
from openpi_prune.adapter.patches import Drifted, Patch, check, import_modules
from openpi_prune.errors import IncompatibleOpenPIError, TracedBeforeChangeWarning

logger = logging.getLogger("openpi_prune")


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


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.handles: dict[Patch, object] = {}
        self.serving = None  # the wrapper on Policy.infer, once that module is imported
        self.pytorch = None  # the wrappers on PI0Pytorch, once its module is imported
        self.strict = True
        self.traced = False  # a wrapped entry point ran under a JAX trace since the last change
        # Installed from OpenPI's import (`lazy`): the modules whose patches are made when they are
        # imported, and what failed if one did not match (raised again at each of its imports).
        self.waiting: set = set()
        self.failure: IncompatibleOpenPIError | None = None
        self.generation = 0  # a post-import hook of an earlier install does nothing


_state = _State()
_registering = threading.local()


def import_openpi():
    """The module of `Pi0`, after importing every module a patch lives in."""
    import_modules(table.MODULES)
    return importlib.import_module(table.MODULES[-1])


def check_openpi() -> list[str]:
    """What differs between the installed OpenPI and the table (empty: compatible); its PyTorch
    model's rows too once that is imported (OpenPI's `models.model` imports it)."""
    pytorch_rows = table.PYTORCH if table.PYTORCH_MODULE in sys.modules else ()
    return check(table.CORE + pytorch_rows)


def exclusive():
    """Hold while patching, unpatching or changing settings (waits for model calls in flight)."""
    return inflight.IN_FLIGHT.change()


def is_installed() -> bool:
    """Whether OpenPI is patched (or, installed from OpenPI's import, will be as it is imported)."""
    return bool(_state.handles or _state.waiting) and _state.failure is None


def installed() -> dict[str, bool]:
    """Each patched attribute's qualified name -> whether our wrapper is still in place on it."""
    with _state.lock:
        return {p.qualname: wrapt.is_wrapped_by(p.stored(), h) for p, h in _state.handles.items()}


# --- the guard around every wrapper ---------------------------------------------------------------


def _guarded(patch: Patch):
    entry_points = [p for p in table.CORE if p.entry_point]

    def guard(wrapped, instance, args, kwargs):
        with inflight.IN_FLIGHT.call() as outermost:
            if outermost and (not _state.handles or inflight.inside_unpatched(entry_points)):
                # Unpatched after this call looked the method up, or inside a call that began
                # unpatched: OpenPI's own, as a whole.
                return wrapped(*args, **kwargs)
            try:
                result = patch.wrapper(wrapped, instance, args, kwargs)
            except Drifted as drift:
                return _drifted(patch, drift)
            if patch.entry_point:
                _note_trace(result)
            return result

    return functools.wraps(patch.wrapper)(guard)


def _drifted(patch: Patch, drift: Drifted):
    """OpenPI's `patch` answered in a form its wrapper cannot use (checked at every call: a signature
    can match while the result changed). Strict: raise; else log, and hand back OpenPI's result."""
    message = f"the installed OpenPI's {patch.qualname} {drift}, not what openpi-prune expects;"
    if settings.active().strict:
        raise IncompatibleOpenPIError(f"{message} nothing was pruned. Set strict=False to carry on unpruned.")
    logger.warning("%s this call runs unpruned.", message)
    return drift.result


def _note_trace(result) -> None:
    """Remember that a wrapped entry point ran under a JAX trace (for `note_patches_changed`)."""
    if not _state.traced:
        import jax

        _state.traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(result))


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


# --- install and uninstall ------------------------------------------------------------------------


def install(*, strict: bool = True, lazy: bool = False) -> bool:
    """Make every core patch, or none of them. Returns whether it patched.

    lazy (from OpenPI's import hook): patch each module as that module is imported. Importing the
    others from inside an import, as the eager way does, would hold one module's import lock while
    taking others', which deadlocks threads importing OpenPI at the same time. A module that does
    not match undoes the others' patches and fails its import (strict)."""
    if lazy:
        return _install_lazily(strict)
    module = import_openpi()
    with _state.lock:
        if is_installed():
            return True
        problems = check_openpi()
        if problems:
            _refuse(problems, module, strict)
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
        _state.handles = _wrap(table.CORE)
        _state.traced = False
        _state.strict = strict
    # Fire at once if OpenPI's serving or PyTorch module is imported already.
    wrapt.register_post_import_hook(_install_serving, table.SERVING.module)
    wrapt.register_post_import_hook(_install_pytorch, table.PYTORCH_MODULE)
    return True


def _refuse(problems: list[str], module, strict: bool) -> None:
    message = "the installed OpenPI does not match what openpi-prune patches:\n  " + "\n  ".join(problems)
    message += f"\n(OpenPI at {getattr(module, '__file__', '?')}.) Nothing was patched."
    if strict:
        raise IncompatibleOpenPIError(message + " Set strict=False to carry on unpruned.")
    logger.warning("%s Pruning is off.", message)


def _install_lazily(strict: bool) -> bool:
    with _state.lock:
        if is_installed():
            return True
        _state.generation += 1
        _state.waiting, _state.failure = set(table.MODULES), None
        _state.strict = strict
        generation = _state.generation
    _registering.now = True
    try:
        for name in table.MODULES:  # each fires at once if its module is imported already
            wrapt.register_post_import_hook(functools.partial(_on_module, generation, strict), name)
    finally:
        _registering.now = False
    wrapt.register_post_import_hook(_install_serving, table.SERVING.module)
    wrapt.register_post_import_hook(_install_pytorch, table.PYTORCH_MODULE)
    return True


def _on_module(generation: int, strict: bool, module) -> None:
    name = module.__name__
    if getattr(_registering, "now", False) and getattr(module.__spec__, "_initializing", False):
        # Fired as it was registered, on a module another thread is importing: wait for that
        # import in a thread that holds no import lock, then patch.
        def when_imported():
            _on_module(generation, strict, importlib.import_module(name))

        threading.Thread(target=when_imported, name=f"openpi-prune: {name}", daemon=True).start()
        return
    with _state.lock:
        if generation != _state.generation:
            return  # uninstalled, or installed anew, since
        if _state.failure is not None:
            raise _state.failure
        if name not in _state.waiting:
            return
        patches = tuple(p for p in table.CORE if p.module == name)
        problems = check(patches)
        if problems:
            _unwrap(_state.handles)
            _state.handles = {}
            try:
                _refuse(problems, module, strict)
            except IncompatibleOpenPIError as error:
                _state.failure = error
                # Python forgets the failed module; importing it again must fail the same way.
                wrapt.register_post_import_hook(functools.partial(_on_module, generation, strict), name)
                raise
            _state.waiting = set()
            return
        _state.handles.update(_wrap(patches))
        _state.waiting.discard(name)


def _wrap(patches) -> dict:
    """Wrap every one of `patches`, or (if one fails) none of them; their handles."""
    done = {}
    try:
        for patch in patches:
            done[patch] = wrapt.wrap_object(patch.owner_object(), patch.name, PruneFunctionWrapper, (_guarded(patch),))
    except BaseException:
        _unwrap(done)
        raise
    return done


def _unwrap(handles: dict) -> None:
    for patch, handle in handles.items():
        wrapt.unwrap_object(patch.owner_object(), patch.name, handle, missing_ok=True)


def _install_serving(module) -> None:
    with _state.lock:
        if not _state.handles or _state.serving is not None:
            return
        problems = check((table.SERVING,))
        if problems:
            logger.warning("openpi-prune: no pruning figures in policy responses: %s", "; ".join(problems))
            return
        _state.serving = _wrap((table.SERVING,))


def _install_pytorch(module) -> None:
    """OpenPI's PyTorch model, all its rows or none. Checked with the core rows when OpenPI is
    imported first (the usual case); imported alone, a mismatch undoes every patch and fails its
    import (strict), or leaves PyTorch models unpruned, with a warning."""
    if getattr(module.__spec__, "_initializing", False):
        # Fired as it was registered, on a module another thread is importing: as `_on_module`.
        def when_imported():
            _install_pytorch(importlib.import_module(module.__name__))

        threading.Thread(target=when_imported, name="openpi-prune: PyTorch", daemon=True).start()
        return
    with _state.lock:
        if not is_installed() or _state.pytorch is not None:
            return
        problems = check(table.PYTORCH)
        if problems:
            if not _state.strict:
                logger.warning(
                    "OpenPI's PyTorch model does not match what openpi-prune patches: %s. PyTorch models run unpruned.",
                    "; ".join(problems),
                )
                return
            _unwrap(_state.handles)
            _state.handles, _state.waiting = {}, set()
            message = "the installed OpenPI does not match what openpi-prune patches:\n  " + "\n  ".join(problems)
            _state.failure = IncompatibleOpenPIError(
                message + "\nNothing was patched. Set strict=False to carry on unpruned."
            )
            raise _state.failure
        _state.pytorch = _wrap(tuple(p for p in table.PYTORCH if not p.per_instance))
        pytorch.ACTIVE = True


def uninstall() -> bool:
    """Remove exactly our wrappers (others' stay). Returns whether anything was removed."""
    with _state.lock:
        if not (_state.handles or _state.waiting or _state.failure):
            return False
        note_patches_changed("was disabled", stacklevel=4)
        _unwrap(_state.handles)
        _state.handles, _state.waiting, _state.failure = {}, set(), None
        _state.generation += 1
        pytorch.forget()
        for group in ("serving", "pytorch"):
            if getattr(_state, group) is not None:
                _unwrap(getattr(_state, group))
                setattr(_state, group, None)
        return True


@contextlib.contextmanager
def patched(patch: Patch, **inputs):
    """A tool's `patch` (`table.TOOLS`) made for the block, with `inputs` in the call state: checked
    first, undone exactly afterwards; calls outside the block (other threads') pass through it."""
    import_modules((patch.module,))
    problems = check((patch,))
    if problems:
        raise IncompatibleOpenPIError(
            "the installed OpenPI does not match what openpi-prune's tools patch: " + "; ".join(problems)
        )
    handle = wrapt.wrap_object(patch.owner_object(), patch.name, PruneFunctionWrapper, (patch.wrapper,))
    try:
        with call.scope(**inputs):
            yield
    finally:
        wrapt.unwrap_object(patch.owner_object(), patch.name, handle, missing_ok=True)


# --- compiled functions made before the patches ---------------------------------------------------


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
