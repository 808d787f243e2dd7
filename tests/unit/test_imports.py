"""The public API is pinned: every change to it shows up here in review."""

import d2l_integrations

EXPECTED_ALL = [
    "AdapterProvenance",
    "D2LEngine",
    "D2LError",
    "Generation",
    "HypernetworkConfig",
    "KnowledgeBase",
    "LoRAAdapter",
    "RouteDecision",
    "Router",
    "RouterConfig",
    "__version__",
    "compose_adapters",
    "load_base_model",
]


def test_all_is_pinned():
    assert sorted(EXPECTED_ALL) == sorted(d2l_integrations.__all__)


def test_every_public_name_resolves():
    for name in d2l_integrations.__all__:
        assert getattr(d2l_integrations, name) is not None


def test_unknown_attribute_raises():
    import pytest

    with pytest.raises(AttributeError):
        d2l_integrations.NotAThing  # noqa: B018
