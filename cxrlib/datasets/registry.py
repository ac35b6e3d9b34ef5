"""The data sets by name: a small registry (as timm's ``@register_model``), no if-chains.

Each source registers one :class:`DatasetEntry` with :func:`register_dataset` (the entries live in
:mod:`cxrlib.datasets.build`): its builder, how notebook 01's flat parameters become the builder's
keyword arguments, and the check :mod:`cxrlib.preflight` runs before any work. Adding a data set =
its module, its test and one registered entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

#: ``(common build kwargs, notebook 01's flat parameters) -> the builder's keyword arguments``
ParamsFn = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
#: ``check(reachable)``: raise :class:`DatasetUnavailable` when the build cannot succeed here;
#: ``reachable(url) -> bool`` probes the network (False when the profile forbids it)
CheckFn = Callable[[Callable[[str], bool]], None]


class DatasetUnavailable(RuntimeError):
    """The data set cannot be built on this machine as configured; the message says what to do."""


@dataclass(frozen=True)
class DatasetEntry:
    """One data set: ``build(**params) -> (table, skips)``; its docstring's first line is ``summary``."""

    name: str
    build: Callable[..., tuple[Any, Any]]
    params: ParamsFn
    check: CheckFn | None = None
    summary: str = ""


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, params: ParamsFn, check: CheckFn | None = None):
    """Decorator: register ``build(**params) -> (table, skips)`` as data set ``name``."""
    def deco(build: Callable[..., tuple[Any, Any]]):
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is registered twice")
        summary = (build.__doc__ or "").strip().splitlines()[0] if build.__doc__ else ""
        _REGISTRY[name] = DatasetEntry(name, build, params, check, summary)
        return build
    return deco


def registered_datasets() -> Mapping[str, DatasetEntry]:
    """Every data set (read-only view, in registration order)."""
    _load_entries()
    return MappingProxyType(_REGISTRY)


def dataset_names() -> tuple[str, ...]:
    return tuple(registered_datasets())


def get_dataset(name: str) -> DatasetEntry:
    """The entry of ``name``; an unknown name is a ValueError listing the known ones."""
    entries = registered_datasets()
    if name not in entries:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(entries)}")
    return entries[name]


def _load_entries() -> None:
    import cxrlib.datasets.build  # noqa: F401  (registers the package's data sets)
