"""The one user-error type of e2e-wsi.

Every problem with what the user gave us (a bad manifest row, a refused config entry, a corrupt file, a
flag out of range) is raised as :class:`UserError`. The ``e2e-wsi`` dispatcher reports it once, as one
line naming the file or row and what to do, with exit status 2; ``e2e-wsi --debug`` shows the traceback.
It subclasses :class:`ValueError` so code (and tests) that caught ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the file, row or option and says what to do about it."""
