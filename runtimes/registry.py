"""The runtime registry: one runner per runtime, each in its own module.

A runner loads one artifact and executes it on numpy inputs in the real
runtime; its packages are imported when it loads, never at registration.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftx_edge.extras import missing_modules, not_installed


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime that executes one artifact format.

    Attributes:
        name: the runtime's name.
        format: the artifact format it runs.
        extra: the pip extra that installs it.
        requires: alternatives, each a tuple of importable modules; the first complete one is used.
        runner: the class, ``runner(path, threads)`` with ``run(inputs)`` and ``info()``.
    """

    name: str
    format: str
    extra: str
    requires: tuple[tuple[str, ...], ...]
    runner: type

    def installed(self) -> bool:
        return any(not missing_modules(group) for group in self.requires)

    def require(self) -> None:
        """Raises ValueError, naming the pip extra, when the runtime is not installed."""
        if not self.installed():
            raise not_installed(f"runtime {self.name}", " or ".join("+".join(group) for group in self.requires),
                                self.extra)

    def load(self, path, threads: int = 1):
        self.require()
        return self.runner(path, threads)


RUNTIMES: dict[str, RuntimeSpec] = {}


def register_runtime(name: str, *, format: str, extra: str, requires: tuple[tuple[str, ...], ...]):
    """Register a runner class as runtime ``name``; returns the class unchanged."""

    def wrap(cls: type) -> type:
        RUNTIMES[name] = RuntimeSpec(name, format, extra, tuple(requires), cls)
        return cls

    return wrap


def runtime_for(fmt: str) -> RuntimeSpec:
    """The runtime that checks artifacts of format ``fmt``."""
    for spec in RUNTIMES.values():
        if spec.format == fmt:
            return spec
    raise ValueError(f"no runtime runs format {fmt!r}")
