"""The error of a slide that cannot be used."""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.errors import UserError


class SlideError(UserError):
    """A slide that cannot be used, with a one-line reason (a user error: the dispatcher prints it once).

    Attributes:
        path: The slide's path or URL (as given).
        reason: One line saying what is wrong and, where possible, what to do.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # always one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")
