"""MIL aggregators behind one interface.

Each is built as ``Cls(in_dim=..., ...)``, exposes ``out_dim`` and implements
``forward(x [B, N, in_dim], mask [B, N] bool | None = None) -> (slide [B, out_dim], attention [B, H, N])``.
Padded positions (mask False) get zero attention and do not change the slide output.
"""

from e2e_wsi.models.aggregators.abmil import ABMIL
from e2e_wsi.models.aggregators.abmilx import ABMILX
from e2e_wsi.models.aggregators.dsmil import DSMIL
from e2e_wsi.models.aggregators.pooling import MaxPool, MeanPool
from e2e_wsi.models.aggregators.transmil import TransMIL

__all__ = ["ABMIL", "ABMILX", "DSMIL", "MaxPool", "MeanPool", "TransMIL"]
