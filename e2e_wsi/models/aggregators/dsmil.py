"""DSMIL (Li et al., 2021): instance classifier + attention to the critical instance."""

from __future__ import annotations

import math

import torch
from torch import nn

from e2e_wsi.models.aggregators._common import (
    InputStem,
    check_dropout,
    check_positive,
    init_weights,
    masked_fill_padding,
    masked_softmax,
    validate_bag,
)
from e2e_wsi.models.registry import register_aggregator


@register_aggregator("dsmil")
class DSMIL(nn.Module):
    """Dual-stream MIL as an aggregator.

    Stream 1 scores every instance with a linear instance classifier (C "critical" scores) and takes
    the max over instances. Stream 2 picks, for each of the C scores, the critical instance (its
    argmax), and attends from every instance to it: a_i = softmax_i(<q_i, q_crit> / sqrt(d_q)); the bag
    embedding is sum_i a_i v_i.

    The original DSMIL turns the bag embedding into class logits with a Conv1d and averages them with
    the max instance score. Here the task head comes after the aggregator, so the slide feature is
    the concatenation [bag embeddings (C * inner_dim), max instance scores (C)] and the head learns
    the mix; this also gives the instance classifier a gradient.

    Args:
        in_dim: Instance feature width D.
        inner_dim: Width after the input stem.
        num_critical: Number C of instance scores / critical instances (the classes in the
            original; 1 is enough for a downstream head).
        query_dim: Width of the query network.
        dropout: Dropout after the input stem.

    Shapes:
        forward(x [B, N, in_dim], mask [B, N] | None) -> (slide [B, C * inner_dim + C],
        attention [B, 1, N]) where attention is the critical-instance attention averaged over the C
        streams.
    """

    def __init__(
        self,
        in_dim: int,
        inner_dim: int = 256,
        num_critical: int = 1,
        query_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        check_positive("in_dim", in_dim, "DSMIL")
        check_positive("num_critical", num_critical, "DSMIL")
        check_dropout(dropout, "DSMIL")
        self.in_dim = in_dim
        self.num_critical = num_critical
        self.out_dim = num_critical * inner_dim + num_critical
        self.stem = InputStem(in_dim, inner_dim, dropout=dropout)
        self.instance_classifier = nn.Linear(inner_dim, num_critical, bias=False)
        self.query = nn.Sequential(
            nn.Linear(inner_dim, query_dim, bias=False),
            nn.ReLU(),
            nn.Linear(query_dim, query_dim, bias=False),
            nn.Tanh(),
        )
        self.value = nn.Sequential(nn.Linear(inner_dim, inner_dim, bias=False), nn.ReLU())
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a bag; see the class docstring for shapes."""
        mask = validate_bag(x, mask)
        h = masked_fill_padding(self.stem(x), mask)
        scores = self.instance_classifier(h)  # [B, N, C]
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
        max_scores, critical = scores.max(dim=1)  # [B, C], [B, C]
        q = self.query(h)  # [B, N, Q]
        q_crit = torch.gather(q, 1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # [B, C, Q]
        logits = q @ q_crit.transpose(1, 2) / math.sqrt(q.shape[-1])  # [B, N, C]
        attn = masked_softmax(logits, None if mask is None else mask.unsqueeze(-1), dim=1)
        bag = attn.transpose(1, 2) @ self.value(h)  # [B, C, inner]
        slide = torch.cat([bag.flatten(1), max_scores], dim=1)
        return slide, attn.mean(dim=-1).unsqueeze(1)
