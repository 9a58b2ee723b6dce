"""Registries: every registered encoder honours the encoder contract; decorators feed the registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2e_wsi.errors import UserError
from e2e_wsi.models import registry
from e2e_wsi.models.registry import (
    AGGREGATORS,
    Registry,
    create_aggregator,
    create_encoder,
    encoder_from_name,
    list_aggregators,
    list_encoders,
)

# Small, offline settings per encoder name; an encoder missing here runs with its defaults.
SMALL: dict[str, dict] = {"timm": {"model_name": "test_resnet"}}
# Names that cannot be built offline, with why; each must share its class with a name that is tested.
OFFLINE_SKIP = {"hf-hub": ("timm", "hub ids need the Hugging Face hub; same class as 'timm'")}


@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_honours_the_contract(name: str) -> None:
    if name in OFFLINE_SKIP:
        twin, why = OFFLINE_SKIP[name]
        assert registry.ENCODERS[name] is registry.ENCODERS[twin], why
        pytest.skip(why)
    torch.manual_seed(0)
    encoder = create_encoder(name, freeze=True, **SMALL.get(name, {}))
    assert isinstance(encoder, nn.Module) and isinstance(encoder.out_dim, int) and encoder.out_dim > 0
    assert len(encoder.mean) == 3 and len(encoder.std) == 3  # its own normalisation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(x)
    assert out.shape == (2, encoder.out_dim) and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in encoder.parameters())  # freeze=True is honoured
    assert callable(getattr(type(encoder), "weights_kwargs", None)), "extract --weights needs it"


def test_extract_spec_names_go_through_the_registry() -> None:
    enc = encoder_from_name("timm:test_resnet", freeze=True)
    assert type(enc).__name__ == "TimmEncoder" and enc.model_name == "test_resnet"
    assert create_encoder("resnet50").out_dim == 1024  # the name's default (arch) is applied
    with pytest.raises(UserError, match="unknown encoder 'resnet51'.*resnet18"):
        encoder_from_name("resnet51")
    with pytest.raises(UserError, match="takes no ':' argument"):
        encoder_from_name("resnet18:x")


def test_decorator_registers_next_to_the_class_and_refuses_a_taken_name() -> None:
    reg = Registry("aggregator-test")

    @reg.register("tiny", heads=2)
    class Tiny(nn.Module):
        def __init__(self, in_dim: int, heads: int = 1) -> None:
            super().__init__()
            self.in_dim, self.heads = in_dim, heads

    assert reg.names() == ["tiny"] and reg["tiny"] is Tiny
    assert reg.create("tiny", in_dim=3).heads == 2 and reg.create("tiny", in_dim=3, heads=5).heads == 5
    with pytest.raises(ValueError, match="'tiny' is taken"):

        @reg.register("tiny")
        class Other(nn.Module):
            pass


def test_aggregator_registry_is_fed_by_the_decorators() -> None:
    from e2e_wsi.models.aggregators import ABMILX

    assert AGGREGATORS["abmilx"] is ABMILX and "abmilx" in list_aggregators()
    assert create_aggregator("meanpool", in_dim=4).out_dim == 4
    with pytest.raises(UserError, match="unknown aggregator 'nope'"):
        create_aggregator("nope", in_dim=4)
