"""Loading mesh configuration: YAML documents in, one frozen :class:`MeshConfig` out.

::

    from meshware.config import load_config

    config = load_config(["mesh/"], service="orders", namespace="shop")
    app = build_asgi_stack(app, config.inbound_config(bundle="certs/bundle.pem"))
    client = mesh_client(config.outbound_config(cert_dir="certs"))

Files hold one or more ``---``-separated documents, each an Istio resource or a meshware
one (:mod:`meshware.config.kinds` lists the kinds). Nothing is silently ignored: an unknown
kind, ``apiVersion``, field or value is an error naming the file, the document, the
resource, the line, the field path and the value, and every error of every file is reported,
not only the first. A few harmless fields (``metadata.labels``, annotations other than
``istio.io/dry-run``, fields the Kubernetes API server writes, ``status``) are allowed
explicitly: each one is logged as a warning and counted in :attr:`MeshConfig.warnings`.

A :class:`MeshConfig` is one immutable object, so a running service can swap a new one in
with a single assignment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from meshware.config.errors import ConfigProblem, MeshConfigError
from meshware.config.kinds import (
    DocumentContext,
    LoadedResource,
    PeerMtls,
    parse_resource,
)
from meshware.exceptions import ConfigurationError
from meshware.outbound.destination import DestinationRule, DestinationRules
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.routing import RouteTable, VirtualService
from meshware.policy.authz import AuthorizationPolicy, Authorizer
from meshware.policy.jwt import JwtRule
from meshware.policy.paths import DEFAULT_PATH_NORMALIZATION, PathNormalization
from meshware.policy.ratelimit import RateLimitPolicy
from meshware.server.tls import MtlsMode

if TYPE_CHECKING:
    from meshware.inbound.stack import InboundConfig
    from meshware.outbound.client import OutboundConfig

__all__ = [
    "ConfigReport",
    "ConfigSource",
    "MeshConfig",
    "SourceFile",
    "check_config",
    "load_config",
]

logger = logging.getLogger("meshware.config")

TEXT_NAME = "<text>"
_YAML_SUFFIXES = (".yaml", ".yml")
_INDEX = re.compile(r"\[(\d+)\]")

# -- where the configuration came from ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceFile:
    """One file a configuration was read from.

    Attributes:
        path: the file as given (``"mesh/policies.yaml"``), or ``"<text>"``.
        mtime_ns: its modification time when read, ``None`` for text.
        size: its size in bytes.
        sha256: the SHA-256 of its content, hex.
        absolute: its absolute path (so that a later change of directory does not matter),
            ``None`` for text.
    """

    path: str
    mtime_ns: int | None
    size: int
    sha256: str
    absolute: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSource:
    """The files a configuration was read from, to tell whether it is still current.

    Attributes:
        files: the files, in the order read.
        digest: the SHA-256 over every file's path and content: two loads of the same
            content have the same digest.
    """

    files: tuple[SourceFile, ...] = ()
    digest: str = ""

    def changed(self) -> bool:
        """Whether a file's modification time or size differs from when it was read, or
        the file is gone (text never changes). A cheap ``stat`` per file, for reloaders."""
        for item in self.files:
            if item.mtime_ns is None or item.absolute is None:
                continue
            try:
                st = os.stat(item.absolute)
            except OSError:
                return True
            if (st.st_mtime_ns, st.st_size) != (item.mtime_ns, item.size):
                return True
        return False


# -- YAML with line numbers --------------------------------------------------------------------


def _node_line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Locator:
    """Finds the line of a field path (``spec.http[0].route``) in a composed document."""

    __slots__ = ("_root",)

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def __call__(self, path: str) -> int | None:
        node = self._root
        if node is None:
            return None
        line = _node_line(node)
        rest = path
        while rest:
            if rest.startswith("."):
                rest = rest[1:]
            if isinstance(node, yaml.SequenceNode):
                m = _INDEX.match(rest)
                if m is None or int(m.group(1)) >= len(node.value):
                    break
                node = node.value[int(m.group(1))]
                rest = rest[m.end() :]
                line = _node_line(node)
            elif isinstance(node, yaml.MappingNode):
                best: tuple[int, yaml.Node, yaml.Node] | None = None
                for key, value in node.value:
                    if not isinstance(key, yaml.ScalarNode):
                        continue
                    for form in (str(key.value), f'["{key.value}"]'):
                        end = len(form)
                        if (
                            rest.startswith(form)
                            and (len(rest) == end or rest[end] in ".[")
                            and (best is None or end > best[0])
                        ):
                            best = (end, key, value)
                if best is None:
                    break
                end, key, value = best
                rest = rest[end:]
                # The last step points at the key: that is the line a person looks for.
                line = _node_line(key) if not rest else _node_line(value)
                node = value
            else:
                break
        return line


class _Scan:
    """What a walk over a composed document found: duplicate keys, and a recursive alias."""

    __slots__ = ("_seen", "_stack", "duplicates", "recursive")

    def __init__(self, node: yaml.Node) -> None:
        self.duplicates: list[tuple[str, int]] = []
        self.recursive: tuple[str, int] | None = None
        self._seen: set[int] = set()
        self._stack: set[int] = set()
        self._walk(node, "")

    def _walk(self, node: yaml.Node, path: str) -> None:
        key = id(node)
        if key in self._stack:
            # An alias to a node that contains it: the data would be infinitely deep.
            self.recursive = self.recursive or (path, _node_line(node))
            return
        if key in self._seen:
            return  # an alias of a node checked already
        self._seen.add(key)
        self._stack.add(key)
        if isinstance(node, yaml.MappingNode):
            names: set[object] = set()
            for child_key, value in node.value:
                name = child_key.value if isinstance(child_key, yaml.ScalarNode) else None
                where = f"{path}.{name}" if path else str(name)
                if name is not None and name != "<<":
                    if name in names:
                        self.duplicates.append((where, _node_line(child_key)))
                    names.add(name)
                self._walk(value, where)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, f"{path}[{index}]")
        self._stack.discard(key)


_RECURSIVE: Final = object()


def _documents(text: str) -> Iterator[tuple[yaml.Node, _Scan, object]]:
    """Each document of ``text``: its node, what a scan of it found, and its data (or
    ``_RECURSIVE`` for a document that refers to itself, which is not constructed).

    Raises:
        yaml.YAMLError: at the first document that is not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            # Before construction: merging "<<" keys rewrites the node's pairs.
            scan = _Scan(node)
            data = _RECURSIVE if scan.recursive else loader.construct_document(node)
            yield node, scan, data
    finally:
        loader.dispose()


# -- reading the inputs ------------------------------------------------------------------------


@dataclass(slots=True)
class _Input:
    display: str
    data: bytes | None
    directory: Path | None
    source: SourceFile | None
    problem: ConfigProblem | None = None


def _inputs(sources: Any, text: str | None, name: str) -> list[_Input]:
    found: list[_Input] = []
    if text is not None:
        data = text.encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(data).hexdigest()
        source = SourceFile(path=name, mtime_ns=None, size=len(data), sha256=digest)
        found.append(_Input(name, data, None, source))
    if sources is None:
        return found
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, Iterable):
        raise ConfigurationError(
            "expected a file, a directory or a list of them", field="sources", value=sources
        )
    for given in sources:
        if not isinstance(given, (str, os.PathLike)):
            raise ConfigurationError(
                "expected a file or directory path", field="sources", value=given
            )
        path = Path(given)
        display = os.fspath(given)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _YAML_SUFFIXES and p.is_file())
            if not files:
                problem = ConfigProblem(
                    message="no .yaml or .yml files in this directory", file=display
                )
                found.append(_Input(display, None, None, None, problem))
            for file in files:
                found.append(_read(file, os.path.join(display, file.name)))
        else:
            found.append(_read(path, display))
    return found


def _read(path: Path, display: str) -> _Input:
    try:
        # stat before reading: a change in between shows as changed() later, never as missed.
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return _Input(
            display, None, None, None, ConfigProblem(message=f"cannot read: {reason}", file=display)
        )
    source = SourceFile(
        path=display,
        mtime_ns=st.st_mtime_ns,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        absolute=str(path.resolve()),
    )
    return _Input(display, data, path.resolve().parent, source)


# -- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigReport:
    """What :func:`check_config` found.

    Attributes:
        documents: how many non-empty documents were read (list items count one each).
        resources: the resources that were read without error.
        errors: every error, in file and document order (problems between documents last).
        warnings: every warning.
        source: the files read.
    """

    documents: int
    resources: tuple[LoadedResource, ...]
    errors: tuple[ConfigProblem, ...]
    warnings: tuple[ConfigProblem, ...]
    source: ConfigSource

    @property
    def ok(self) -> bool:
        """Whether there are no errors."""
        return not self.errors


def _line_key(problem: ConfigProblem) -> int:
    return problem.line if problem.line is not None else 0


class _Checker:
    def __init__(self, namespace: str, root_namespace: str) -> None:
        self.namespace = namespace
        self.root_namespace = root_namespace
        self.documents = 0
        self.resources: list[LoadedResource] = []
        self.errors: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []
        self.locators: dict[int, _Locator] = {}

    def file(self, item: _Input) -> None:
        if item.problem is not None:
            self.errors.append(item.problem)
            return
        try:
            text = (item.data or b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            self.errors.append(
                ConfigProblem(message=f"not UTF-8 text: {exc.reason}", file=item.display)
            )
            return
        index = 0
        documents = _documents(text)
        while True:
            try:
                node, scan, data = next(documents)
            except StopIteration:
                break
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
                line = int(mark.line) + 1 if mark is not None else None
                problem = getattr(exc, "problem", None) or str(exc)
                self.errors.append(
                    ConfigProblem(
                        message=f"invalid YAML: {problem}",
                        file=item.display,
                        document=index + 1,
                        line=line,
                    )
                )
                break
            index += 1
            if data is None:
                continue  # an empty document (a trailing ---) holds nothing to ignore
            self.document(item, index, node, scan, data)

    def _context(
        self, item: _Input, index: int, locator: _Locator, list_item: int | None = None
    ) -> DocumentContext:
        return DocumentContext(
            file=item.display,
            document=index,
            locate=locator,
            namespace=self.namespace,
            root_namespace=self.root_namespace,
            directory=item.directory,
            item=list_item,
        )

    def document(
        self,
        item: _Input,
        index: int,
        node: yaml.Node,
        scan: _Scan,
        data: object,
    ) -> None:
        locator = _Locator(node)
        if scan.recursive is not None:
            path, line = scan.recursive
            self.documents += 1
            self.errors.append(
                ConfigProblem(
                    message="a YAML alias refers to a node that contains it; the document would "
                    "be infinitely deep",
                    file=item.display,
                    document=index,
                    line=line,
                    field=path or None,
                )
            )
            return
        for path, line in scan.duplicates:
            self.errors.append(
                ConfigProblem(
                    message="duplicate key; YAML keeps only the last value",
                    file=item.display,
                    document=index,
                    line=line,
                    field=path,
                )
            )
        if isinstance(data, Mapping) and data.get("kind") == "List":
            self._list(item, index, locator, data)
            return
        self.documents += 1
        ctx = self._context(item, index, locator)
        self._resource(ctx, data, locator)

    def _list(self, item: _Input, index: int, locator: _Locator, data: Mapping[str, Any]) -> None:
        ctx = self._context(item, index, locator)
        ctx.resource = "List"
        for key, value in data.items():
            if key == "metadata":
                ctx.warn("ignored: list metadata carries nothing meshware reads", "metadata")
            elif key not in ("apiVersion", "kind", "items"):
                ctx.error("unknown field; expected apiVersion, kind, items", str(key), value)
        if data.get("apiVersion") != "v1":
            ctx.error("expected v1 for a kind: List", "apiVersion", data.get("apiVersion"))
        items = data.get("items")
        if isinstance(items, (str, bytes)) or not isinstance(items, list):
            ctx.error("expected a list of resources", "items", items)
            items = []
        self.errors.extend(ctx.errors)
        self.warnings.extend(ctx.warnings)
        for position, resource in enumerate(items):
            self.documents += 1
            self._resource(self._context(item, index, locator, position), resource, locator)

    def _resource(self, ctx: DocumentContext, data: object, locator: _Locator) -> None:
        resource = parse_resource(ctx, data)
        # In the order a person reads the document.
        self.errors.extend(sorted(ctx.errors, key=_line_key))
        self.warnings.extend(sorted(ctx.warnings, key=_line_key))
        if resource is not None:
            self.resources.append(resource)
            self.locators[id(resource)] = locator

    # -- problems that involve several resources ------------------------------------------------

    def at(
        self,
        resource: LoadedResource,
        field: str,
        message: str,
        value: object = None,
        *,
        warning: bool = False,
    ) -> None:
        full = resource.field_prefix + field
        locator = self.locators.get(id(resource))
        problem = ConfigProblem(
            message=message,
            file=resource.file,
            document=resource.document,
            resource=f"{resource.kind} {resource.name}",
            line=locator(full) if locator is not None else None,
            field=full,
            value=value,
            severity="warning" if warning else "error",
        )
        (self.warnings if warning else self.errors).append(problem)

    def cross_checks(self) -> None:
        """Problems between documents; a resource with such an error is dropped."""
        steps: list[Callable[[set[int]], None]] = [
            self._unique_names,
            self._routes,
            self._destinations,
            self._registries,
            lambda bad: self._same_level("PeerAuthentication", bad),
            lambda bad: self._same_level("RateLimit", bad),
            self._issuers,
        ]
        for step in steps:
            bad: set[int] = set()
            step(bad)
            # One error per resource: a dropped resource takes part in no later check.
            self.resources = [r for r in self.resources if id(r) not in bad]
        self._subset_references()

    def _unique_names(self, bad: set[int]) -> None:
        seen: dict[tuple[str, str, str], LoadedResource] = {}
        for resource in self.resources:
            key = (resource.kind, resource.namespace, resource.name)
            first = seen.get(key)
            if first is None:
                seen[key] = resource
                continue
            self.at(
                resource,
                "metadata.name",
                f"another {resource.kind} of this name in namespace {resource.namespace} is in "
                f"{first.where}; names are unique per kind and namespace",
                resource.name,
            )
            bad.add(id(resource))

    def _unique(
        self,
        kind: str,
        claims: Callable[[object], Iterable[tuple[str, str]]],
        clash: Callable[[LoadedResource], str],
        bad: set[int],
    ) -> None:
        # Each key (a host, a service) belongs to one resource of the kind: ``claims(value)``
        # gives (field, key) pairs, and a later claimant is reported with ``clash(first)``.
        owners: dict[str, LoadedResource] = {}
        for resource in self.of_kind(kind):
            for where, key in claims(resource.value):
                first = owners.setdefault(key, resource)
                if first is not resource:
                    self.at(resource, where, clash(first), key)
                    bad.add(id(resource))

    def _routes(self, bad: set[int]) -> None:
        def hosts(value: object) -> Iterable[tuple[str, str]]:
            if isinstance(value, VirtualService):
                yield from ((f"spec.hosts[{i}]", host) for i, host in enumerate(value.hosts))

        self._unique(
            "VirtualService",
            hosts,
            lambda first: (
                f"this host is routed by VirtualService {first.name} too "
                f"({first.where}); merge their routes into one"
            ),
            bad,
        )

    def _destinations(self, bad: set[int]) -> None:
        def host(value: object) -> Iterable[tuple[str, str]]:
            if isinstance(value, DestinationRule):
                yield "spec.host", value.host

        self._unique(
            "DestinationRule",
            host,
            lambda first: (
                f"DestinationRule {first.name} ({first.where}) has this host too; one rule per host"
            ),
            bad,
        )

    def _registries(self, bad: set[int]) -> None:
        def services(value: object) -> Iterable[tuple[str, str]]:
            if isinstance(value, StaticRegistry):
                yield from ((f"spec.services.{name}", name) for name in sorted(value.services))

        self._unique(
            "ServiceRegistry",
            services,
            lambda first: (
                f"ServiceRegistry {first.name} ({first.where}) lists this service "
                "too; list each service once"
            ),
            bad,
        )

    def _related(self, a: LoadedResource, b: LoadedResource) -> bool:
        # Whether one workload can be subject to both resources.
        if a.target is None or b.target is None or not a.target.overlaps(b.target):
            return False
        root = self.root_namespace
        return a.namespace == b.namespace or root in (a.namespace, b.namespace)

    def _same_level(self, kind: str, bad: set[int]) -> None:
        found = self.of_kind(kind)
        for later_index, later in enumerate(found):
            for first in found[:later_index]:
                mine = later.target.apps if later.target is not None else None
                theirs = first.target.apps if first.target is not None else None
                if mine is None and theirs is None:
                    if first.namespace != later.namespace:
                        continue
                    scope = f"namespace {later.namespace}"
                elif mine is not None and theirs is not None and self._related(first, later):
                    scope = "service " + ", ".join(sorted(mine & theirs))
                else:
                    continue
                self.at(
                    later,
                    "metadata.name",
                    f"{kind} {first.name} ({first.where}) applies to {scope} at the same level; "
                    "which one wins would be arbitrary, so keep one",
                    later.name,
                )
                bad.add(id(later))
                break

    def _issuers(self, bad: set[int]) -> None:
        found = self.of_kind("RequestAuthentication")
        for later_index, later in enumerate(found):
            rules = later.value if isinstance(later.value, tuple) else ()
            for first in found[:later_index]:
                if not self._related(first, later) or not isinstance(first.value, tuple):
                    continue
                theirs = {rule.issuer for rule in first.value}
                for index, rule in enumerate(rules):
                    if rule.issuer in theirs:
                        self.at(
                            later,
                            f"spec.jwtRules[{index}].issuer",
                            f"RequestAuthentication {first.name} ({first.where}) accepts this "
                            "issuer for the same workloads; each issuer needs exactly one rule",
                            rule.issuer,
                        )
                        bad.add(id(later))
                if id(later) in bad:
                    break  # one resource it clashes with is enough to name

    def _subset_references(self) -> None:
        rules = DestinationRules(
            r.value for r in self.of_kind("DestinationRule") if isinstance(r.value, DestinationRule)
        )
        for resource in self.of_kind("VirtualService"):
            if not isinstance(resource.value, VirtualService):
                continue
            for i, route in enumerate(resource.value.http):
                targets = [
                    (f"spec.http[{i}].route[{j}].destination.subset", d)
                    for j, d in enumerate(route.route)
                ]
                if route.mirror is not None:
                    targets.append((f"spec.http[{i}].mirror.subset", route.mirror))
                for where, destination in targets:
                    subset = destination.subset
                    if subset is None:
                        continue
                    rule = rules.get(destination.host)
                    if rule is None:
                        self.at(
                            resource,
                            where,
                            f"no DestinationRule defines the subsets of {destination.host}; "
                            "calls routed here will fail",
                            subset,
                            warning=True,
                        )
                    elif subset not in rule.subset_names:
                        known = ", ".join(sorted(rule.subset_names)) or "none"
                        self.at(
                            resource,
                            where,
                            f"DestinationRule {rule.name} for {rule.host} has no such subset "
                            f"(subsets: {known}); calls routed here will fail",
                            subset,
                            warning=True,
                        )

    def of_kind(self, kind: str) -> list[LoadedResource]:
        return [r for r in self.resources if r.kind == kind]


def _check_names(namespace: object, root_namespace: object) -> None:
    for name, value in (("namespace", namespace), ("root_namespace", root_namespace)):
        if not isinstance(value, str) or not value:
            raise ConfigurationError("expected a namespace name", field=name, value=value)


def check_config(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    text: str | None = None,
    namespace: str = "default",
    root_namespace: str = "istio-system",
    name: str = TEXT_NAME,
) -> ConfigReport:
    """Read and validate configuration without raising on what it finds.

    Args:
        sources: a file, a directory (its ``*.yaml`` and ``*.yml`` files, in name order) or
            several of them.
        text: YAML text to read (before the files, when both are given).
        namespace: the namespace of resources without ``metadata.namespace``.
        root_namespace: the mesh's root namespace: scoped resources there apply to every
            namespace (Istio's ``istio-system``).
        name: how ``text`` is named in problems.

    Returns:
        A :class:`ConfigReport` with every error and warning found.

    Raises:
        ConfigurationError: neither ``sources`` nor ``text`` is given, or a namespace
            argument is not a non-empty string. Problems in the files are never raised.
    """
    if sources is None and text is None:
        raise ConfigurationError("give files (sources) or text to read", field="sources")
    _check_names(namespace, root_namespace)
    checker = _Checker(namespace, root_namespace)
    inputs = _inputs(sources, text, name)
    for item in inputs:
        checker.file(item)
    checker.cross_checks()
    files = tuple(item.source for item in inputs if item.source is not None)
    digest = hashlib.sha256()
    for source in files:
        digest.update(f"{source.path}\0{source.sha256}\n".encode("utf-8", "surrogatepass"))
    return ConfigReport(
        documents=checker.documents,
        resources=tuple(checker.resources),
        errors=tuple(checker.errors),
        warnings=tuple(checker.warnings),
        source=ConfigSource(files=files, digest=digest.hexdigest()),
    )


# -- the configuration -------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


def _tuple_of(value: object, kind: type[Any], name: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"expected a list of {kind.__name__}, got {_type_name(value)}", field=name, value=value
        )
    items = tuple(value)
    for index, item in enumerate(items):
        if not isinstance(item, kind):
            raise ConfigurationError(
                f"expected {kind.__name__}, got {_type_name(item)}",
                field=f"{name}[{index}]",
                value=item,
            )
    return items


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MeshConfig:
    """A mesh configuration for one service: everything read from the files, frozen.

    Built by :func:`load_config`; a new configuration is a new object (swap it in with one
    assignment), and :meth:`for_service` derives the view of another service. Equality is
    identity; compare :attr:`source` digests to tell whether two loads read the same files.

    Attributes:
        service: the service this view is for (its ``app`` label), or ``None``: then only
            resources without a selector apply.
        namespace: the service's namespace.
        root_namespace: the mesh's root namespace (scoped resources there apply everywhere).
        resources: every resource read, whether or not it applies to :attr:`service`.
        policies: the AuthorizationPolicies that apply, in file order; a policy from another
            namespace (the root namespace) is named ``<namespace>/<name>``. Dry-run policies
            (``istio.io/dry-run: "true"``) are included with ``dry_run=True``.
        jwt_rules: the ``jwtRules`` of every RequestAuthentication that applies.
        mtls_mode: the PeerAuthentication mode that applies: a selector's over the
            namespace's over the mesh's, ``UNSET`` inheriting; ``None`` when none sets one
            (the server keeps its own default).
        routes: every VirtualService, as a route table.
        destination_rules: every DestinationRule.
        registry: every ServiceRegistry merged, or ``None`` when there is none.
        rate_limit: the RateLimit that applies (a selector's over the namespace's over the
            mesh's), or ``None``.
        source: the files read.
        warnings: what was ignored along the way (each one was logged).
        scope_warnings: what looks like a mistake in this view: a resource that selects
            :attr:`service` but is in another namespace, so it does not apply (logged too).

    Raises:
        ConfigurationError: a field has the wrong type.
    """

    service: str | None = None
    namespace: str = "default"
    root_namespace: str = "istio-system"
    resources: tuple[LoadedResource, ...] = ()
    policies: tuple[AuthorizationPolicy, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()
    mtls_mode: MtlsMode | None = None
    routes: RouteTable = field(default_factory=RouteTable)
    destination_rules: tuple[DestinationRule, ...] = ()
    registry: StaticRegistry | None = None
    rate_limit: RateLimitPolicy | None = None
    source: ConfigSource = field(default_factory=ConfigSource)
    warnings: tuple[ConfigProblem, ...] = ()
    scope_warnings: tuple[ConfigProblem, ...] = ()

    def __post_init__(self) -> None:
        if self.service is not None and (not isinstance(self.service, str) or not self.service):
            raise ConfigurationError(
                "expected the service's name or None", field="service", value=self.service
            )
        _check_names(self.namespace, self.root_namespace)
        for name, kind in (
            ("resources", LoadedResource),
            ("policies", AuthorizationPolicy),
            ("jwt_rules", JwtRule),
            ("destination_rules", DestinationRule),
            ("warnings", ConfigProblem),
            ("scope_warnings", ConfigProblem),
        ):
            object.__setattr__(self, name, _tuple_of(getattr(self, name), kind, name))
        for name, kinds, what in (
            ("mtls_mode", MtlsMode, "an MtlsMode"),
            ("routes", RouteTable, "a RouteTable"),
            ("registry", StaticRegistry, "a StaticRegistry"),
            ("rate_limit", RateLimitPolicy, "a RateLimitPolicy"),
            ("source", ConfigSource, "a ConfigSource"),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kinds):
                raise ConfigurationError(
                    f"expected {what}, got {_type_name(value)}", field=name, value=value
                )
        if not isinstance(self.routes, RouteTable):
            raise ConfigurationError("expected a RouteTable", field="routes", value=self.routes)

    def for_service(self, service: str, *, namespace: str | None = None) -> MeshConfig:
        """The view of the same files for ``service`` (in ``namespace``, by default this
        configuration's).

        Raises:
            MeshConfigError: two resources of one kind apply to the service at the same level
                (``load_config`` reports these already, so this only happens for
                configurations built by hand).
        """
        if not isinstance(service, str) or not service:
            raise ConfigurationError("expected the service's name", field="service", value=service)
        return _assemble(
            self.resources,
            service=service,
            namespace=self.namespace if namespace is None else namespace,
            root_namespace=self.root_namespace,
            source=self.source,
            warnings=self.warnings,
        )

    def _for(self, overrides: dict[str, Any]) -> MeshConfig:
        service = overrides.get("service", self.service)
        namespace = overrides.get("namespace", self.namespace)
        if service is None:
            raise ConfigurationError(
                "no service: load with service=..., call for_service(name), or pass service=",
                field="service",
            )
        if service == self.service and namespace == self.namespace:
            return self
        return self.for_service(service, namespace=namespace)

    def authorizer(
        self, *, path_normalization: PathNormalization = DEFAULT_PATH_NORMALIZATION
    ) -> Authorizer:
        """A new :class:`~meshware.policy.authz.Authorizer` of :attr:`policies`."""
        return Authorizer(self.policies, path_normalization=path_normalization)

    def inbound_config(self, **overrides: Any) -> InboundConfig:
        """The :class:`~meshware.inbound.stack.InboundConfig` of this service.

        It carries the service's name and namespace, :attr:`policies`, :attr:`jwt_rules` and
        :attr:`rate_limit`. Under ``STRICT`` mTLS, when ``overrides`` give a trust
        ``bundle``, ``require_identity`` defaults to ``True`` (the server refuses plaintext
        connections itself: ``meshware serve --mtls strict``).

        Args:
            **overrides: any :class:`~meshware.inbound.stack.InboundConfig` field
                (``bundle``, ``metrics``, ...). ``service`` and ``namespace`` select the view
                of another service first.

        Raises:
            ConfigurationError: there is no service, or the result is invalid.
        """
        from meshware.inbound.stack import InboundConfig

        config = self._for(overrides)
        kwargs: dict[str, Any] = {
            "service": config.service,
            "namespace": config.namespace,
            "policies": config.policies,
            "jwt_rules": config.jwt_rules,
            "rate_limit": config.rate_limit,
        }
        kwargs.update(overrides)
        if (
            "require_identity" not in overrides
            and config.mtls_mode is MtlsMode.STRICT
            and kwargs.get("bundle") is not None
        ):
            kwargs["require_identity"] = True
        return InboundConfig(**kwargs)

    def outbound_config(self, **overrides: Any) -> OutboundConfig:
        """The :class:`~meshware.outbound.client.OutboundConfig` of this service.

        It carries the service's name and namespace, :attr:`routes` (when there are
        VirtualServices), :attr:`destination_rules` and, when there is one, :attr:`registry`
        as the resolver.

        Args:
            **overrides: any :class:`~meshware.outbound.client.OutboundConfig` field
                (``cert_dir``, ``metrics``, ...). ``service`` and ``namespace`` select the
                view of another service first.

        Raises:
            ConfigurationError: there is no service, or the result is invalid.
        """
        from meshware.outbound.client import OutboundConfig

        config = self._for(overrides)
        kwargs: dict[str, Any] = {
            "service": config.service,
            "namespace": config.namespace,
            "routes": config.routes if config.routes.virtual_services else None,
            "destinations": config.destination_rules,
        }
        if config.registry is not None:
            kwargs["resolver"] = config.registry
        kwargs.update(overrides)
        return OutboundConfig(**kwargs)

    def __repr__(self) -> str:
        return (
            f"MeshConfig(service={self.service!r}, namespace={self.namespace!r}, "
            f"{len(self.resources)} resources, {len(self.policies)} policies, "
            f"{len(self.jwt_rules)} jwt rules, mtls={self.mtls_mode and self.mtls_mode.name}, "
            f"{len(self.routes.virtual_services)} virtual services, "
            f"{len(self.destination_rules)} destination rules)"
        )


def _conflict(kind: str, service: str | None, found: Sequence[LoadedResource]) -> MeshConfigError:
    names = " and ".join(f"{r.name} ({r.where})" for r in found[:2])
    return MeshConfigError(
        [
            ConfigProblem(
                message=f"two {kind}s apply to {service or 'the namespace'} at the same level: "
                f"{names}",
                resource=kind,
            )
        ]
    )


def _winner(
    found: Sequence[LoadedResource],
    kind: str,
    service: str | None,
    namespace: str,
    root_namespace: str,
) -> list[LoadedResource]:
    """The resources by precedence, most specific first, one per level."""
    levels: dict[int, list[LoadedResource]] = {2: [], 1: [], 0: []}
    for resource in found:
        levels[resource.specificity(namespace, root_namespace)].append(resource)
    ordered: list[LoadedResource] = []
    for level in (2, 1, 0):
        if len(levels[level]) > 1:
            raise _conflict(kind, service, levels[level])
        ordered.extend(levels[level])
    return ordered


def _scope_warnings(
    resources: Sequence[LoadedResource], service: str | None, namespace: str, root: str
) -> tuple[ConfigProblem, ...]:
    # A policy written for this service in another namespace is most likely a namespace
    # left out of load_config: without a warning the service would run without it.
    found: list[ConfigProblem] = []
    for r in resources:
        apps = r.target.apps if r.target is not None else None
        if service is None or apps is None or service not in apps:
            continue
        if r.namespace in (namespace, root):
            continue
        found.append(
            ConfigProblem(
                message=f"selects service {service}, but is in namespace {r.namespace} and the "
                f"service in {namespace}, so it does not apply (is the namespace right?)",
                file=r.file,
                document=r.document,
                resource=f"{r.kind} {r.name}",
                line=r.line,
                field=f"{r.field_prefix}metadata.namespace",
                value=r.namespace,
                severity="warning",
            )
        )
    for problem in found:
        logger.warning("%s", problem)
    return tuple(found)


def _assemble(
    resources: Sequence[LoadedResource],
    *,
    service: str | None,
    namespace: str,
    root_namespace: str,
    source: ConfigSource,
    warnings: Sequence[ConfigProblem],
) -> MeshConfig:
    applying = [r for r in resources if r.applies_to(service, namespace, root_namespace)]

    def values(kind: str) -> list[Any]:
        return [r.value for r in applying if r.kind == kind]

    jwt_rules: list[JwtRule] = []
    issuers: set[str] = set()
    for rules in values("RequestAuthentication"):
        for rule in rules:
            if rule.issuer in issuers:
                raise MeshConfigError(
                    [
                        ConfigProblem(
                            message=f"two RequestAuthentications accept issuer {rule.issuer!r} "
                            f"for {service or 'the namespace'}",
                            resource="RequestAuthentication",
                        )
                    ]
                )
            issuers.add(rule.issuer)
            jwt_rules.append(rule)
    mtls_mode: MtlsMode | None = None
    peers = [r for r in applying if r.kind == "PeerAuthentication"]
    for resource in _winner(peers, "PeerAuthentication", service, namespace, root_namespace):
        if isinstance(resource.value, PeerMtls) and resource.value.mode is not None:
            # UNSET inherits from the next level.
            mtls_mode = resource.value.mode
            break
    limits = [r for r in applying if r.kind == "RateLimit"]
    ordered = _winner(limits, "RateLimit", service, namespace, root_namespace)
    rate_limit = ordered[0].value if ordered else None
    if not isinstance(rate_limit, RateLimitPolicy):
        rate_limit = None
    registries = values("ServiceRegistry")
    registry: StaticRegistry | None = None
    if registries:
        merged: dict[str, Sequence[Endpoint]] = {}
        for part in registries:
            for name in sorted(part.services):
                merged[name] = part.resolve(name) or ()
        registry = StaticRegistry(merged)
    return MeshConfig(
        service=service,
        namespace=namespace,
        root_namespace=root_namespace,
        resources=tuple(resources),
        policies=tuple(values("AuthorizationPolicy")),
        jwt_rules=tuple(jwt_rules),
        mtls_mode=mtls_mode,
        routes=RouteTable(values("VirtualService")),
        destination_rules=tuple(values("DestinationRule")),
        registry=registry,
        rate_limit=rate_limit,
        source=source,
        warnings=tuple(warnings),
        scope_warnings=_scope_warnings(resources, service, namespace, root_namespace),
    )


def load_config(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    text: str | None = None,
    service: str | None = None,
    namespace: str = "default",
    root_namespace: str = "istio-system",
    name: str = TEXT_NAME,
) -> MeshConfig:
    """Read mesh configuration from files or text into one frozen :class:`MeshConfig`.

    Args:
        sources: a YAML file, a directory (its ``*.yaml`` and ``*.yml`` files, in name
            order) or several of them; each file holds one or more ``---``-separated
            documents (a ``kind: List`` document counts each of its ``items``).
        text: YAML text to read (before the files, when both are given).
        service: the service to configure (its ``app`` label); ``None`` applies only the
            resources without a selector. See :meth:`MeshConfig.for_service`.
        namespace: the service's namespace, and the namespace of resources that name none.
        root_namespace: the mesh's root namespace; scoped resources there apply to every
            namespace.
        name: how ``text`` is named in problems (``"<text>"``).

    Returns:
        The configuration. Warnings (ignored fields) are logged on the ``meshware.config``
        logger and kept in :attr:`MeshConfig.warnings`.

    Raises:
        MeshConfigError: the files have errors; ``problems`` holds every one, each naming
            the file, document, resource, line, field and value.
        ConfigurationError: neither ``sources`` nor ``text`` is given, or an argument is
            invalid.
    """
    report = check_config(
        sources, text=text, namespace=namespace, root_namespace=root_namespace, name=name
    )
    for warning in report.warnings:
        logger.warning("%s", warning)
    if report.errors:
        raise MeshConfigError(report.errors, report.warnings)
    if service is not None and (not isinstance(service, str) or not service):
        raise ConfigurationError(
            "expected the service's name or None", field="service", value=service
        )
    return _assemble(
        report.resources,
        service=service,
        namespace=namespace,
        root_namespace=root_namespace,
        source=report.source,
        warnings=report.warnings,
    )
