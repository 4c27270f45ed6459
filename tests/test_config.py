"""The typed config: TOML scenarios, Flower run-config overrides, clear errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.config import ConfigError, config_from_run_config, demo_config, load_config
from fedseg.privacy.keys import KeyFileError
from fedseg.site import resolve_site

SCENARIOS = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"


def test_scenario_paths_resolve_relative_to_the_file():
    cfg = load_config(SCENARIOS / "us-nerve.toml")
    assert cfg.name == "us-nerve"
    assert Path(cfg.data.path).is_absolute() and cfg.data.path.endswith("shared/data/us-nerve")
    assert cfg.privacy.custody == "client" and cfg.privacy.transform == "klt"


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nae_epoch = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[training\]: ae_epoch"):
        load_config(bad)
    bad.write_text('[training]\nae_epochs = "many"\n')
    with pytest.raises(ConfigError, match="training.ae_epochs must be int"):
        load_config(bad)
    bad.write_text('[privacy]\ncustody = "hospital"\n')
    with pytest.raises(ConfigError, match="privacy.custody"):
        load_config(bad)
    bad.write_text("[model]\nimage_size = 100\n")
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_flower_run_config_overrides():
    cfg = config_from_run_config(
        {
            "scenario": "",
            "quick": True,
            "out-dir": "x",
            "privacy.custody": "server",
            "training.finetune-share": "average",  # blind needs client custody
        }
    )
    assert cfg.privacy.custody == "server" and cfg.out_dir == "x"
    # "" is the demo (fedseg demo's embedded default), and quick shrinks its split training
    assert (
        config_from_run_config({}).training.finetune_epochs
        == demo_config().training.finetune_epochs
    )
    assert cfg.training.finetune_epochs == 15 < demo_config().training.finetune_epochs
    with pytest.raises(ConfigError, match="custody"):
        config_from_run_config({"privacy.custody": "server"})
    with pytest.raises(ConfigError, match="names no config field"):
        config_from_run_config({"privacy.nothing": 1})


def test_node_config_selects_site_and_key(tmp_path):
    cfg = config_from_run_config({"quick": True, "out-dir": str(tmp_path)})
    setup = resolve_site(cfg, {"partition-id": 1})
    assert setup.split.name == "hospital-2"
    assert setup.key_file == tmp_path / "keys" / "federation.key"  # the default: one secret
    # Another key for the same site's models is refused (its fingerprint is recorded there),
    # so the per-site-key run gets its own folder.
    cfg.privacy.key_scope, cfg.training.finetune_share = "site", "none"
    with pytest.raises(KeyFileError, match="is not the key the models"):
        resolve_site(cfg, {"partition-id": 1})
    cfg.out_dir = str(tmp_path / "per-site")
    expected = tmp_path / "per-site" / "keys" / "hospital-2.key"
    assert resolve_site(cfg, {"partition-id": 1}).key_file == expected
    with pytest.raises(ValueError, match="data-dir"):
        resolve_site(cfg, {})


def test_keygen_cli_writes_0600_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    key = tmp_path / "site.key"
    result = runner.invoke(app, ["keygen", "--out", str(key)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_text()
    again = runner.invoke(app, ["keygen", "--out", str(key)])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    assert key.read_text() == before
