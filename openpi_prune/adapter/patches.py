"""A patch: one attribute of OpenPI, what must hold for its wrapper to be right, and the wrapper.

`check` compares rows with the installed OpenPI before anything is patched: the signature, and the
statements (whitespace-insensitive, in order) the wrapper relies on.
"""

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable

from openpi_prune.errors import OpenPIDependencyError, OpenPINotFoundError

MODULE = "openpi.models.pi0"


class Drifted(Exception):
    """Raised by a wrapper when OpenPI answered in a form it cannot use (a signature can match while
    the result changed); `result` is OpenPI's own answer, handed back when not strict."""

    def __init__(self, problem: str, result):
        super().__init__(problem)
        self.result = result


@dataclasses.dataclass(frozen=True)
class Patch:
    owner: str  # "" for the module itself, else a class name in it
    name: str
    parameters: tuple[str, ...]
    wrapper: Callable  # wrapt's (wrapped, instance, args, kwargs)
    # Statements (whitespace-insensitive) the wrapper relies on, in the order they must appear.
    source: tuple[str, ...] = ()
    module: str = MODULE
    # Runs the others: a call of it that began unpatched stays unpatched throughout.
    entry_point: bool = False
    # Patched only once a program imports its module, and a mismatch costs figures, not pruning.
    on_import: bool = False
    # Not wrapped on the class: its wrapper is set on each new model by another row's (`torch.compile`
    # traces a class's wrapt wrapper as the function it wraps, and would skip it).
    per_instance: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.owner + '.' if self.owner else ''}{self.name}"

    @property
    def key(self) -> str:
        """Its short name, e.g. `Pi0.embed_prefix`."""
        return f"{self.owner}.{self.name}" if self.owner else self.name

    def owner_object(self):
        module = sys.modules[self.module]
        return getattr(module, self.owner) if self.owner else module

    def original(self):
        """OpenPI's function as it is now (perhaps wrapped). A class's own attribute: renamed in
        OpenPI, an inherited one of the same name would be wrapped in its place, and never run."""
        owner = self.owner_object()
        if self.owner and self.name not in vars(owner):
            raise AttributeError(self.name)
        return getattr(owner, self.name)

    def stored(self):
        """The attribute as stored (a class attribute, not the bound wrapper its descriptor makes)."""
        return inspect.getattr_static(self.owner_object(), self.name)


def bind(wrapped, args, kwargs) -> dict:
    """A wrapper's call arguments by the wrapped function's parameter names."""
    return inspect.signature(wrapped).bind(*args, **kwargs).arguments


def import_modules(modules: tuple[str, ...]) -> None:
    """Import OpenPI's `modules`, with an error that says what to install when one cannot be."""
    try:
        for name in modules:
            importlib.import_module(name)
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
            f"OpenPI not found: cannot import {missing or modules[-1]} ({error}). openpi-prune patches an "
            "installed OpenPI: install upstream openpi (e.g. from its repository, or `pip install --no-deps "
            "rpent-openpi==0.2.2` plus its JAX dependencies) into this environment."
        ) from error


def _squash(text: str) -> str:
    return "".join(text.split())


def check(patches) -> list[str]:
    """What differs between the installed OpenPI and what `patches` assume (empty: compatible)."""
    problems = []
    for patch in patches:
        try:
            function = inspect.unwrap(patch.original())
        except AttributeError:
            problems.append(f"{patch.qualname} is missing")
            continue
        try:
            parameters = tuple(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            parameters = ()
        if parameters != patch.parameters:
            problems.append(
                f"{patch.qualname} takes ({', '.join(parameters)}), expected ({', '.join(patch.parameters)})"
            )
        if patch.source:
            problems += _check_source(patch, function)
    return problems


def _check_source(patch: Patch, function) -> list[str]:
    try:
        source = _squash(inspect.getsource(function))
    except (OSError, TypeError):
        return [f"{patch.qualname}: source unavailable, cannot check its statements"]
    position = 0
    for statement in patch.source:
        found = source.find(_squash(statement), position)
        if found < 0:
            return [f"{patch.qualname} no longer has `{statement}` (in this order)"]
        position = found
    return []
