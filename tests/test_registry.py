"""Site identity bound to the node: the operator's registry decides which node is which site."""

from __future__ import annotations

import pytest

from fedseg.deploy.registry import RegistryError, load_registry, record_node
from strategies.autoencoders import registration

METRICS = {"n_train": 4, "n_test": 2}


def info(site: str) -> dict:
    return {"site": site, "class_names": ["nerve"], "stats_json": "{}"}


def test_record_and_load(tmp_path):
    path = tmp_path / "sites.json"
    record_node(path, 11, "hospital-a")
    record_node(path, 12, "hospital-b")
    record_node(path, 11, "hospital-a")  # re-confirming is fine
    assert load_registry(path) == {11: "hospital-a", 12: "hospital-b"}
    with pytest.raises(RegistryError, match="already registered as node 11"):
        record_node(path, 13, "hospital-a")
    with pytest.raises(ValueError, match="site name"):
        record_node(path, 14, "../etc")
    assert load_registry(path) == {11: "hospital-a", 12: "hospital-b"}  # nothing lost


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (None, "no such registry"),
        ("not json", "not a readable registry"),
        ("[1, 2]", "expected an object"),
        ('{"x": "a"}', "entry 'x'"),
        ('{"1": "a b"}', "site name"),
        ('{"1": "a", "2": "a"}', "more than one node"),
    ],
)
def test_bad_registry_named(tmp_path, text, said):
    path = tmp_path / "sites.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RegistryError, match=said) as err:
        load_registry(path)
    assert str(path) in str(err.value)


def test_a_node_is_only_the_site_it_was_registered_as():
    registry = {11: "hospital-a", 12: "hospital-b"}
    site = registration(11, METRICS, info("hospital-a"), {}, registry)
    assert site.name == "hospital-a" and site.node_id == 11
    with pytest.raises(ValueError, match="registered as 'hospital-b', not 'hospital-a'"):
        registration(12, METRICS, info("hospital-a"), {}, registry)
    with pytest.raises(ValueError, match="not in the coordinator's registry"):
        registration(99, METRICS, info("hospital-c"), {}, registry)
    # Without a registry (a simulation) the reported name is taken, still unique.
    assert registration(99, METRICS, info("hospital-c"), {}).name == "hospital-c"
    with pytest.raises(ValueError, match="already held by node 11"):
        registration(12, METRICS, info("hospital-a"), {"hospital-a": site})
