"""Rebinding a framework's functions in every module that holds them (shared by the
integrations): a ``from x import f`` copy is another attribute bound to the same object,
and a registry (a module-level dict, such as verl's ``POLICY_LOSS_REGISTRY``) holds it as a
value, so both are found by identity, in every imported module of the framework, including
modules imported after a patch when the patch is applied again."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType


def modules(package: str) -> list[ModuleType]:
    """The imported modules of ``package`` (itself and its submodules)."""
    return [
        m for name, m in list(sys.modules.items())
        if m is not None and (name == package or name.startswith(package + "."))
    ]  # fmt: skip


def swap(package: str, old: dict[str, object], new: dict[str, object]) -> None:
    """In every imported module of ``package``, rebind each attribute, and each value of a
    module-level dict, that is ``old[name]`` (the object itself) to ``new[name]``."""
    by_id = {id(fn): new[name] for name, fn in old.items()}  # (the old objects are alive: ids unique)
    for module in modules(package):
        for attr, value in list(vars(module).items()):
            if id(value) in by_id:
                setattr(module, attr, by_id[id(value)])
            elif type(value) is dict:
                for key, entry in list(value.items()):
                    if id(entry) in by_id:
                        value[key] = by_id[id(entry)]


def locations(package: str, fns: dict[str, object]) -> list[str]:
    """Where the objects in ``fns`` are bound: ``module.attr`` and ``module.DICT[key]``."""
    ids = {id(fn) for fn in fns.values()}
    found = []
    for module in modules(package):
        for attr, value in list(vars(module).items()):
            if id(value) in ids:
                found.append(f"{module.__name__}.{attr}")
            elif type(value) is dict:
                found += [f"{module.__name__}.{attr}[{key!r}]" for key, e in list(value.items()) if id(e) in ids]
    return sorted(found)


class Patcher:
    """The patch state of one integration: ``build()`` returns ``(originals, replacements)``,
    two dicts keyed alike; the replacements read :attr:`backend` when called."""

    def __init__(self, package: str, build: Callable[[], tuple[dict[str, object], dict[str, object]]]):
        self.package = package
        self.build = build
        self.backend = "auto"
        self.originals: dict[str, object] = {}
        self.replacements: dict[str, object] = {}

    def patch(self, backend: str = "auto") -> list[str]:
        """Put the replacements in place (see the integration's docstring); returns the
        locations patched. Called again while patched, it sets ``backend`` and patches the
        modules imported since."""
        self.backend = backend
        if not self.originals:
            originals, replacements = self.build()
            self.originals.update(originals)
            self.replacements.update(replacements)
        swap(self.package, self.originals, self.replacements)  # again: modules imported since
        return self.locations()

    def unpatch(self) -> list[str]:
        """Put the framework's own functions back everywhere the patch put a replacement;
        returns the locations restored (none when not patched)."""
        if not self.originals:
            return []
        restored = self.locations()
        swap(self.package, self.replacements, self.originals)
        self.originals.clear()
        self.replacements.clear()
        return restored

    def is_patched(self) -> bool:
        return bool(self.originals)

    @contextmanager
    def patched(self, backend: str = "auto") -> Iterator[None]:
        """``with patched(): ...`` patches for the block (and unpatches only if it patched)."""
        was_patched, outer_backend = self.is_patched(), self.backend
        self.patch(backend)
        try:
            yield
        finally:
            if not was_patched:
                self.unpatch()
            else:  # an enclosing patch() keeps its own backend
                self.patch(outer_backend)

    def locations(self) -> list[str]:
        return locations(self.package, self.replacements)
