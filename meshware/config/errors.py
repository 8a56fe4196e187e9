"""Problems found in mesh configuration files, located as precisely as the files allow.

Every problem names the file, the document (counted from 1, as a person reading the file
counts ``---``-separated documents), the resource (``kind`` and ``metadata.name``), the line,
the field path and the offending value::

    mesh.yaml: document 3 (VirtualService reviews), line 14:
        spec.http[0].route[0].destination.subsett: unknown field; ... (value: 'v2')

(on one line). :func:`meshware.config.load_config` raises :class:`MeshConfigError` with every
error it found, never only the first; ``meshware check`` prints them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from meshware.exceptions import ConfigurationError

__all__ = ["ConfigProblem", "MeshConfigError", "Severity"]

Severity = Literal["error", "warning"]
"""``"error"``: the configuration is refused. ``"warning"``: something harmless was ignored."""

_MAX_VALUE = 80


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigProblem:
    """One error or warning in a configuration, with where it is.

    Attributes:
        message: what is wrong and what was expected.
        file: the file as it was given (``"mesh.yaml"``), ``"<text>"`` for text, or ``None``
            when the problem concerns no file.
        document: the document's position in its file, counted from 1, or ``None``.
        resource: ``"<kind> <metadata.name>"`` (``"VirtualService reviews"``) when known.
        line: the line in the file, counted from 1, when known.
        field: the dotted path of the field inside the document
            (``"spec.http[0].route[0].destination.subset"``), or ``None`` for the document
            as a whole.
        value: the offending value, when there is one.
        severity: ``"error"`` or ``"warning"``.
    """

    message: str
    file: str | None = None
    document: int | None = None
    resource: str | None = None
    line: int | None = None
    field: str | None = None
    value: object = dataclasses.field(default=None, compare=False)
    severity: Severity = "error"

    @property
    def location(self) -> str:
        """Where the problem is: ``"mesh.yaml: document 3 (VirtualService reviews), line 14"``."""
        parts: list[str] = []
        if self.file is not None:
            parts.append(self.file)
        where = ""
        if self.document is not None:
            where = f"document {self.document}"
            if self.resource:
                where += f" ({self.resource})"
        elif self.resource:
            where = self.resource
        if self.line is not None:
            where = f"{where}, line {self.line}" if where else f"line {self.line}"
        if where:
            parts.append(where)
        return ": ".join(parts)

    def __str__(self) -> str:
        text = self.location
        if self.field:
            text = f"{text}: {self.field}" if text else self.field
        text = f"{text}: {self.message}" if text else self.message
        if self.value is not None:
            text += f" (value: {_shown(self.value)})"
        return text


class MeshConfigError(ConfigurationError):
    """A configuration has errors; :attr:`problems` holds every one of them.

    The message lists them all, one per line. ``field`` and ``value`` are those of the first
    problem, so code that handles a single :class:`~meshware.exceptions.ConfigurationError`
    still finds them.

    Attributes:
        problems: the errors, in file and document order.
        warnings: the warnings found along the way.
    """

    def __init__(
        self, problems: Sequence[ConfigProblem], warnings: Sequence[ConfigProblem] = ()
    ) -> None:
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            lines = "\n".join(f"  {problem}" for problem in self.problems)
            message = f"{len(self.problems)} errors in the mesh configuration:\n{lines}"
        first = self.problems[0] if self.problems else None
        # The problem's text already holds its field; keep ConfigurationError from repeating it.
        super().__init__(message)
        self.field = first.field if first is not None else None
        self.value = first.value if first is not None else None
