"""Rebinding a framework's functions in every module that holds them (shared by the
integrations): a ``from x import f`` copy is another attribute bound to the same object, a
registry (a module-level dict, such as verl's ``ADV_ESTIMATOR_REGISTRY``) holds it as a
value and a class defined in the framework as an attribute (a method), so all are found by
identity, in every imported module of the framework, including modules imported after a
patch when the patch is applied again. Not found: a function wrapped in ``staticmethod`` or
``classmethod``, and members of classes nested in another class."""

from __future__ import annotations

import functools
import inspect
import numbers
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch


def _inside(name, package: str) -> bool:
    return isinstance(name, str) and (name == package or name.startswith(package + "."))


def modules(package: str) -> list[ModuleType]:
    """The imported modules of ``package`` (itself and its submodules)."""
    return [m for name, m in list(sys.modules.items()) if m is not None and _inside(name, package)]


def check_params(integration: str, where: str, fn, required: tuple[str, ...], *, exact: bool = False) -> None:
    """Refuse (before anything is changed) a function whose leading parameters (``exact``: all its
    parameters) are not ``required``: the replacement binds arguments by these names (``exact``:
    it spells out the whole list, so a release that adds one must not be patched)."""
    params = tuple(inspect.signature(fn).parameters)
    if (params if exact else params[: len(required)]) != required:
        raise RuntimeError(
            f"rlhf_kernels.integrations.{integration}: {where}({', '.join(params)}) does not "
            f"{'have' if exact else 'start with'} the expected parameters ({', '.join(required)}); nothing was changed"
        )


_PLAIN = (type(None), bool, int, float, str)


def binary_mask(mask, like) -> bool:
    """A mask of ``like``'s shape and device whose values are 0 and 1: the frameworks multiply
    by their masks, so other weights change their results, while the ops read nonzero as
    valid. Floating masks are checked (a device sync); bool and integer ones are taken as
    0 / 1 without one (the frameworks' masks of those types are)."""
    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape or mask.device != like.device:
        return False
    return not mask.dtype.is_floating_point or bool(((mask == 0) | (mask == 1)).all())


def promoted_by_mask(dtype: torch.dtype, mask: torch.Tensor) -> torch.dtype:
    """The dtype of the frameworks' arithmetic on ``dtype`` values times the mask: a floating
    mask promotes them, a bool or integer one does not."""
    return torch.promote_types(dtype, mask.dtype) if mask.dtype.is_floating_point else dtype


def count(valid: torch.Tensor) -> torch.Tensor:
    """How many are true, as a float64 tensor (an int64 one would divide in float32)."""
    return valid.sum(dtype=torch.float64)


def defaults_beyond(fn, known: tuple[str, ...]):
    """A test of a call's bound arguments (``wrap``'s dict): every argument of ``fn`` outside
    ``known`` is at its default (releases add arguments a replacement does not implement).
    Values other than plain scalars count as set (their ``==`` may not give a bool)."""
    params = inspect.signature(fn).parameters

    def default(value, name):
        d = params[name].default
        return value is d or (isinstance(value, _PLAIN) and isinstance(d, _PLAIN) and value == d)

    return lambda a: all(default(a[name], name) for name in a if name not in known)


def wrap(original, body):
    """A replacement with ``original``'s signature: ``body(args)`` gets the bound arguments
    (a dict, defaults applied) and returns the result, or ``None`` for a call it does not
    cover, which then goes to ``original`` with the same arguments."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = body(bound.arguments)
        return original(*args, **kwargs) if out is None else out

    replacement.__rlhf_kernels_original__ = original
    return replacement


def _holders(package: str):
    """(owner, name, value, set) for every module attribute, value of a module-level dict
    and attribute of a class defined in the package, in the package's imported modules."""
    seen = set()
    for module in modules(package):
        for attr, value in list(vars(module).items()):
            yield f"{module.__name__}.{attr}", value, functools.partial(setattr, module, attr)
            if type(value) is dict:
                for key, entry in list(value.items()):
                    yield f"{module.__name__}.{attr}[{key!r}]", entry, functools.partial(value.__setitem__, key)
            elif isinstance(value, type) and id(value) not in seen and _inside(vars(value).get("__module__"), package):
                seen.add(id(value))
                for name, member in list(vars(value).items()):
                    where = f"{value.__module__}.{value.__qualname__}.{name}"
                    yield where, member, functools.partial(setattr, value, name)


def swap(package: str, old: dict[str, object], new: dict[str, object]) -> None:
    """In every imported module of ``package``, rebind each attribute, value of a
    module-level dict and attribute of a class defined there that is ``old[name]`` (the
    object itself) to ``new[name]``."""
    by_id = {id(fn): new[name] for name, fn in old.items()}  # (the old objects are alive: ids unique)
    for _, value, rebind in list(_holders(package)):
        if id(value) in by_id:
            rebind(by_id[id(value)])


def locations(package: str, fns: dict[str, object]) -> list[str]:
    """Where the objects in ``fns`` are bound: ``module.attr``, ``module.DICT[key]`` and
    ``module.Class.attr``."""
    ids = {id(fn) for fn in fns.values()}
    return sorted({where for where, value, _ in _holders(package) if id(value) in ids})


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


class WithHead:
    """An integration's ``patch`` / ``unpatch`` / ``patched`` over its main :class:`Patcher`
    and an opt-in one for the framework's fused LM head (``fused_lm_head=True``: the head's
    function routed through :func:`rlhf_kernels.linear_token_logprobs`)."""

    def __init__(self, main: Patcher, head: Patcher):
        self.main = main
        self.head = head

    def patch(self, backend: str = "auto", *, fused_lm_head: bool = False) -> list[str]:
        """Put the replacements in place; returns the locations patched. ``fused_lm_head=True``
        also patches the fused LM head; called again, ``patch`` sets the backend, patches the
        modules imported since, and the head as ``fused_lm_head`` says. A refused call changes
        nothing."""
        if not isinstance(fused_lm_head, bool):
            raise TypeError(f"fused_lm_head: expected a bool, got {type(fused_lm_head).__name__}")
        from rlhf_kernels import _dispatch

        if backend != "auto" and backend not in _dispatch.BACKENDS:  # (the replacements read it on every call)
            raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of {_dispatch.BACKENDS}")
        head_was_patched = self.head.is_patched()
        head = self.head.patch(backend) if fused_lm_head else []  # first: a refusal changes nothing
        try:
            where = self.main.patch(backend)
        except Exception:
            if fused_lm_head and not head_was_patched:
                self.head.unpatch()
            raise
        if not fused_lm_head:
            self.head.unpatch()
        return sorted(set(where) | set(head))

    def unpatch(self) -> list[str]:
        """Put the framework's own functions back everywhere; returns the locations restored."""
        return sorted(set(self.main.unpatch()) | set(self.head.unpatch()))

    def is_head_patched(self) -> bool:
        return self.head.is_patched()

    @contextmanager
    def patched(self, backend: str = "auto", *, fused_lm_head: bool = False) -> Iterator[None]:
        """``with patched(): ...`` patches for the block and then restores the state before it
        (an enclosing ``patch()`` keeps its backend and its head setting)."""
        outer = (self.main.is_patched(), self.main.backend, self.head.is_patched(), self.head.backend)
        self.patch(backend, fused_lm_head=fused_lm_head)
        try:
            yield
        finally:
            was_patched, outer_backend, head_was_patched, outer_head_backend = outer
            if not was_patched:
                self.unpatch()
            else:
                self.main.patch(outer_backend)
                if head_was_patched:
                    self.head.patch(outer_head_backend)
                else:
                    self.head.unpatch()


def head_covered(hidden, weight, bias, labels, temperature, backend) -> bool:
    """Whether a fused LM head's call can go to linear_token_logprobs as the framework computes
    it: plain tensors (no DTensor / DeepSpeed ZeRO-3 partition, which the frameworks gather
    themselves, also again in their backward), hidden ``[..., H]`` and a ``[V, H]`` weight (and
    ``[V]`` bias) of one floating dtype, integer labels of hidden's leading shape, a positive
    real temperature, and a kernel backend for the device (the torch composition would build
    the ``[N, V]`` logits the fused head avoids)."""
    from rlhf_kernels import _dispatch
    from rlhf_kernels.ops.logprobs import FLOAT_DTYPES

    tensors = (hidden, weight, labels) + (() if bias is None else (bias,))
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) and not hasattr(t, "ds_id") for t in tensors):
        return False
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        return False
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        return False
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        return False
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        return False
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        return False
    try:
        return _dispatch.resolve(backend, hidden.device, "token_logprobs_fwd_native") != "torch"
    except (ValueError, RuntimeError, TypeError):
        return False


def with_apply(original: type, apply) -> type:
    """A subclass of the autograd.Function ``original`` whose ``apply`` is ``apply(cls, ...)``
    (the fused heads' replacements: the op on the calls it covers, ``original.apply`` on the
    rest). It holds no attribute pointing at ``original``: patching finds objects by identity
    in the framework's classes too, and would swap that for the replacement itself."""
    return type(original.__name__, (original,), {"apply": classmethod(apply), "__doc__": original.__doc__,
                                                 "__module__": original.__module__})  # fmt: skip

