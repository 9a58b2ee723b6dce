"""Name -> model registries for aggregators and patch encoders, filled by decorators next to each class.

As in timm (``@register_model``), a model registers itself where it is defined::

    @register_aggregator("abmil")
    class ABMIL(nn.Module): ...

    @register_encoder("resnet18", arch="resnet18")   # a name may carry default arguments
    @register_encoder("resnet50", arch="resnet50")
    class ResNetEncoder(nn.Module): ...

and everything that picks a model by name (``create_aggregator``, ``create_encoder``, ``e2e-wsi extract
--encoder NAME``, the contract tests that loop over every registered model) reads the registry, so a new
model needs no other list to be edited. YAML configs keep choosing classes by ``class_path``.

The built-in models register when their modules are imported; :func:`_builtins` imports them before
any lookup, so ``list_encoders()`` is complete without the caller importing anything first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from e2e_wsi.errors import UserError

T = TypeVar("T", bound=Callable[..., Any])

# Modules whose import registers the built-in models (imported lazily: they import this module).
_BUILTIN_MODULES = {
    "aggregator": ("e2e_wsi.models.aggregators",),
    "encoder": ("e2e_wsi.models.encoders", "e2e_wsi.models.timm_encoder"),
}


@dataclass(frozen=True)
class Entry:
    """One registered name.

    Attributes:
        name: The registered name (``abmilx``, ``resnet18``, ``timm``).
        factory: The class (or function) that builds the model.
        defaults: Keyword arguments the name implies (``arch="resnet18"``); explicit ones win.
        arg: For ``NAME:ARG`` specs (``timm:vit_small_patch16_224``): the keyword ``ARG`` fills.
        keep_prefix: Pass the whole spec (``hf-hub:ORG/NAME``) as ``arg``, not just the part after ``:``.
    """

    name: str
    factory: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    arg: str | None = None
    keep_prefix: bool = False


class Registry(Mapping[str, Callable[..., Any]]):
    """Registered models of one kind; a read-only mapping name -> class (or factory).

    Args:
        kind: ``aggregator`` or ``encoder`` (used in messages and to find the built-in modules).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str | None = None, *, arg: str | None = None, keep_prefix: bool = False, **defaults: Any
    ) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name`` (default: the lower-case class name).

        Raises:
            ValueError: If ``name`` is taken by another class (two models must not share a name).
        """

        def decorate(factory: T) -> T:
            key = name or factory.__name__.lower()
            old = self._entries.get(key)
            if old is not None and _qualname(old.factory) != _qualname(factory):
                raise ValueError(f"{self.kind} name {key!r} is taken by {_qualname(old.factory)}")
            self._entries[key] = Entry(key, factory, dict(defaults), arg, keep_prefix)
            return factory

        return decorate

    def entry(self, name: str) -> Entry:
        """The entry of ``name``.

        Raises:
            UserError: For an unknown name; the message lists the registered ones.
        """
        _builtins(self.kind)
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}: use one of {self.names()}")
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the model registered as ``name`` with its defaults updated by ``kwargs``."""
        entry = self.entry(name)
        return entry.factory(**{**entry.defaults, **kwargs})

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        _builtins(self.kind)
        return sorted(self._entries)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        _builtins(self.kind)
        return self._entries[name].factory

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _qualname(obj: Callable[..., Any]) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _builtins(kind: str) -> None:
    for module in _BUILTIN_MODULES.get(kind, ()):
        importlib.import_module(module)


AGGREGATORS = Registry("aggregator")
ENCODERS = Registry("encoder")


def register_aggregator(name: str | None = None, **defaults: Any) -> Callable[[T], T]:
    """Register an aggregator class: built as ``Cls(in_dim=..., **kwargs)``, exposes ``out_dim`` and
    ``forward(x [B, N, D], mask [B, N] | None) -> (slide [B, D_out], attention [B, H, N])``."""
    return AGGREGATORS.register(name, **defaults)


def register_encoder(
    name: str | None = None, *, arg: str | None = None, keep_prefix: bool = False, **defaults: Any
) -> Callable[[T], T]:
    """Register a patch encoder: ``forward(x [N, 3, H, W]) -> [N, D]``, with ``out_dim`` and its own
    ``mean``/``std``. ``arg`` names the keyword a ``NAME:ARG`` spec fills (see :func:`encoder_from_name`)."""
    return ENCODERS.register(name, arg=arg, keep_prefix=keep_prefix, **defaults)


def list_aggregators() -> list[str]:
    """Names of every registered aggregator, sorted."""
    return AGGREGATORS.names()


def list_encoders() -> list[str]:
    """Names of every registered encoder, sorted."""
    return ENCODERS.names()


def create_aggregator(name: str, in_dim: int, **kwargs: Any) -> Any:
    """Build a registered aggregator by name for inputs of width ``in_dim``.

    Raises:
        UserError: For an unknown name (the message lists the known ones).
    """
    return AGGREGATORS.create(name, in_dim=in_dim, **kwargs)


def create_encoder(name: str, **kwargs: Any) -> Any:
    """Build a registered encoder by name (``resnet18``, ``timm`` with ``model_name=...``).

    Raises:
        UserError: For an unknown name (the message lists the known ones).
    """
    return ENCODERS.create(name, **kwargs)


def encoder_from_name(spec: str, **kwargs: Any) -> Any:
    """Build an encoder from a command-line name: ``NAME`` or ``NAME:ARG``.

    ``ARG`` fills the keyword the entry registered as ``arg`` (``timm:vit_small_patch16_224`` ->
    ``TimmEncoder(model_name="vit_small_patch16_224")``; ``hf-hub:ORG/NAME`` keeps its prefix).

    Raises:
        UserError: Unknown name, or an ``ARG`` given to a name that takes none.
    """
    name, sep, rest = spec.partition(":")
    entry = ENCODERS.entry(name)
    if sep:
        if entry.arg is None:
            raise UserError(f"encoder {name!r} takes no ':' argument (got {spec!r})")
        kwargs[entry.arg] = spec if entry.keep_prefix else rest
    return ENCODERS.create(name, **kwargs)


def is_encoder_name(spec: str) -> bool:
    """Whether ``spec`` (``NAME`` or ``NAME:ARG``) starts with a registered encoder name."""
    return spec.partition(":")[0] in ENCODERS.names()
