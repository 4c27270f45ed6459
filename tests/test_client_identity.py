"""A simulated hospital's name, profile and key file come from the scenario alone: the ClientApp's
guard and profile mod run for every message, in whichever Ray actor is free, and must not load
the hospital's images for them (fedseg.data.simulated_hospital)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import fedseg.data
from clients.app import Hospital
from fedseg.config import demo_config, load_config
from fedseg.data import load_federation, simulated_hospital
from fedseg.data.dataset import DataError
from fedseg.site import resolve_site

SCENARIOS = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _scenarios():
    yield "demo", demo_config()  # synthetic hospitals
    yield "demo-malicious", load_config(SCENARIOS / "demo-malicious.toml")  # [[hospitals]]
    if (SHARED / "us-nerve").is_dir():
        yield "us-nerve", load_config(SCENARIOS / "us-nerve.toml")  # one data set, cut in 3


@pytest.mark.parametrize(
    "name, cfg", list(_scenarios()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_simulated_hospital_is_named_as_its_loaded_site(name, cfg):
    sites = load_federation(cfg)
    assert [simulated_hospital(cfg, i) for i in range(len(sites))] == [
        (s.name, s.profile, s.index) for s in sites
    ]
    with pytest.raises(DataError, match="partition_id 3 out of range"):
        simulated_hospital(cfg, cfg.federation.num_sites)


def test_the_guard_knows_a_simulated_hospital_without_loading_its_data(tmp_path, monkeypatch):
    cfg = demo_config(out_dir=str(tmp_path / "run"))
    node = {"partition-id": 1}
    setup = resolve_site(cfg, node)  # registration: loads the data and makes the key
    assert setup.key_file is not None and setup.key_file.is_file()

    def no_loading(*args, **kwargs):
        raise AssertionError("the guard loaded a hospital's data")

    monkeypatch.setattr(fedseg.data, "load_federation", no_loading)
    fedseg.data._cached_site.cache_clear()  # another actor: nothing loaded in it yet
    context = Context(1, 1, node, RecordDict(), {})
    assert Hospital(cfg).identity(context) == (cfg, setup.split.name, setup.key_file)

    cfg.privacy.key_scope = "federation"
    assert Hospital(cfg).identity(context)[2] == setup.key_file.with_name("federation.key")
