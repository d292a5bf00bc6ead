"""User-facing errors: the CLI prints them as one line (no traceback) and exits with code 2."""

from __future__ import annotations


class BnasError(Exception):
    """An error caused by user input (a file, a flag, the environment), with a message that
    says what is wrong and what to do."""


class LocatedError(BnasError):
    """An error about one value of a file the user wrote, located by structured fields.

    Carries the file, the YAML path of the culprit (``cells.normal.nodes.n1[0]``) and what
    was expected, and renders them as ``file: path: message`` on one line. Code that needs
    the path reads ``.path``, never the rendered text.
    """

    def __init__(self, message: str, path: str = "", file: str | None = None):
        self.message = message
        self.path = path
        self.file = file
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(part for part in (self.file, self.path) if part)
        return f"{where}: {self.message}" if where else self.message

    def __str__(self) -> str:
        return self._render()

    def in_file(self, file: str) -> LocatedError:
        """The same error, attributed to ``file`` (set once, by whoever read the file)."""
        if self.file is None:
            self.file = file
            self.args = (self._render(),)
        return self


class GenotypeError(LocatedError, ValueError):
    """A genotype or search-space file that cannot be used (see ``LocatedError``)."""

    def in_file(self, file: str) -> GenotypeError:
        super().in_file(file)
        return self


class LimitError(GenotypeError):
    """A file or network past one of the size caps of ``bnas.yaml_io.LIMITS`` (or past the
    machine's memory); the message names the cap and the variable that raises it."""


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without walking a huge value.

    Error messages quote user values; an alias-expanded YAML list can be gigabytes when
    printed in full, so only the first few elements and levels are looked at.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 6, 6
    r.maxstring, r.maxother, r.maxlong = limit, limit, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
