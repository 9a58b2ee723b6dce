"""MIL aggregators behind one interface.

Each is built as ``Cls(in_dim=..., ...)``, exposes ``out_dim`` and implements
``forward(x [B, N, in_dim], mask [B, N] bool | None = None) -> (slide [B, out_dim], attention [B, H, N])``.
Padded positions (mask False) get zero attention and do not change the slide output.

Every aggregator registers itself with ``@register_aggregator("name")`` next to its class
(:mod:`e2e_wsi.models.registry`); importing this package imports each of them, so :data:`AGGREGATORS`
is complete. The contract tests loop over the registry (as timm's tests loop over every registered model),
so a new aggregator is tested as soon as it is registered.
"""

from e2e_wsi.models.aggregators.abmil import ABMIL
from e2e_wsi.models.aggregators.abmilx import ABMILX
from e2e_wsi.models.aggregators.dsmil import DSMIL
from e2e_wsi.models.aggregators.pooling import MaxPool, MeanPool
from e2e_wsi.models.aggregators.transmil import TransMIL
from e2e_wsi.models.registry import AGGREGATORS, create_aggregator, list_aggregators, register_aggregator

__all__ = [
    "ABMIL",
    "ABMILX",
    "AGGREGATORS",
    "DSMIL",
    "MaxPool",
    "MeanPool",
    "TransMIL",
    "create_aggregator",
    "list_aggregators",
    "register_aggregator",
]
