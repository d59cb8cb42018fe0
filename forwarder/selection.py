"""Which containers a rule applies to: matchers on name, image, labels and compose labels.

Pure functions of a :class:`~forwarder.records.ContainerInfo`: discovery's decision table
(:mod:`forwarder.docker.containers`) asks :class:`Selection` whether a container is followed,
and the multiline rules use the same :func:`compile_matcher`.

- ``name``: a glob on the name without its leading ``/``;
- ``image``: a glob tried on the image as the container was created from it, and without its
  tag or digest (``nginx:1.27`` is tried as ``nginx:1.27`` and ``nginx``);
- ``label``: ``key`` (the label is set, to anything) or ``key=glob`` (its value matches);
- ``compose_project`` / ``compose_service``: globs on the ``com.docker.compose.project`` and
  ``com.docker.compose.service`` labels (a container without the label does not match).

All the keys of one matcher must match. Globs are :mod:`fnmatch`'s, case-sensitive.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from forwarder.config import ContainerMatcher, ContainersConfig
from forwarder.records import ContainerInfo

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"

Predicate = Callable[[ContainerInfo], bool]


def _glob(pattern: str) -> Callable[[str], bool]:
    return re.compile(fnmatch.translate(pattern)).match  # type: ignore[return-value]


def image_names(image: str) -> tuple[str, ...]:
    """The image as given, and without its digest and tag: what an image glob is tried on."""
    bare = image.partition("@")[0]
    slash = bare.rfind("/")
    colon = bare.rfind(":")
    if colon > slash:
        bare = bare[:colon]
    return (image,) if bare == image else (image, bare)


def compile_matcher(matcher: ContainerMatcher) -> Predicate:
    """A predicate true for the containers ``matcher`` picks."""
    tests: list[Predicate] = []
    if matcher.name is not None:
        name = _glob(matcher.name)
        tests.append(lambda c: bool(name(c.name.removeprefix("/"))))
    if matcher.image is not None:
        image = _glob(matcher.image)
        tests.append(lambda c: any(image(n) for n in image_names(c.image)))
    if matcher.label is not None:
        key, eq, value = matcher.label.partition("=")
        if eq:
            tests.append(_label_glob(key, value))
        else:
            tests.append(lambda c: key in c.labels)
    if matcher.compose_project is not None:
        tests.append(_label_glob(COMPOSE_PROJECT, matcher.compose_project))
    if matcher.compose_service is not None:
        tests.append(_label_glob(COMPOSE_SERVICE, matcher.compose_service))
    return lambda c: all(test(c) for test in tests)


def _label_glob(key: str, pattern: str) -> Predicate:
    value = _glob(pattern)

    def test(c: ContainerInfo) -> bool:
        got = c.labels.get(key)
        return got is not None and bool(value(got))

    return test


def describe(matcher: ContainerMatcher) -> str:
    """``name="*-debug", image="busybox*"``: a matcher as the config wrote it."""
    return ", ".join(
        f"{key}={value!r}" for key, value in matcher.model_dump(exclude_none=True).items()
    )


@dataclass(frozen=True)
class Selection:
    """``[containers]`` include/exclude, compiled: :meth:`refused` says why a container is
    not followed, or None when it is."""

    include: Sequence[tuple[ContainerMatcher, Predicate]] = ()
    exclude: Sequence[tuple[ContainerMatcher, Predicate]] = ()

    @classmethod
    def from_config(cls, config: ContainersConfig) -> Selection:
        return cls(
            include=[(m, compile_matcher(m)) for m in config.include],
            exclude=[(m, compile_matcher(m)) for m in config.exclude],
        )

    def refused(self, container: ContainerInfo) -> str | None:
        if self.include and not any(test(container) for _, test in self.include):
            return "it matches no containers.include matcher"
        for index, (matcher, test) in enumerate(self.exclude):
            if test(container):
                return f"it matches containers.exclude[{index}] ({describe(matcher)})"
        return None
