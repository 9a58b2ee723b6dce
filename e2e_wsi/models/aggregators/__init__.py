"""MIL aggregators behind one interface.

Each is built as ``Cls(in_dim=..., ...)``, exposes ``out_dim`` and implements
``forward(x [B, N, in_dim], mask [B, N] bool | None = None) -> (slide [B, out_dim], attention [B, H, N])``.
Padded positions (mask False) get zero attention and do not change the slide output.
"""

from torch import nn

from e2e_wsi.models.aggregators.abmil import ABMIL
from e2e_wsi.models.aggregators.abmilx import ABMILX
from e2e_wsi.models.aggregators.dsmil import DSMIL
from e2e_wsi.models.aggregators.pooling import MaxPool, MeanPool
from e2e_wsi.models.aggregators.transmil import TransMIL

# Every aggregator, by name. The contract tests loop over this registry (as timm's tests loop over every
# registered model), so a new aggregator is tested as soon as it is added here.
AGGREGATORS: dict[str, type[nn.Module]] = {
    "abmil": ABMIL,
    "abmilx": ABMILX,
    "dsmil": DSMIL,
    "maxpool": MaxPool,
    "meanpool": MeanPool,
    "transmil": TransMIL,
}


def list_aggregators() -> list[str]:
    """Names of every registered aggregator, sorted."""
    return sorted(AGGREGATORS)


def create_aggregator(name: str, in_dim: int, **kwargs) -> nn.Module:
    """Build a registered aggregator by name: ``AGGREGATORS[name](in_dim=in_dim, **kwargs)``.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}: use one of {list_aggregators()}")
    return AGGREGATORS[name](in_dim=in_dim, **kwargs)


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
]
