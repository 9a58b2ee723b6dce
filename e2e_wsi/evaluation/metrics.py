"""The functional test metrics; they live with the task specs in :mod:`e2e_wsi.tasks.metrics`."""

from e2e_wsi.tasks.metrics import *  # noqa: F403
from e2e_wsi.tasks.metrics import __all__  # noqa: F401
