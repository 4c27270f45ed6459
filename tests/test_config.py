"""The typed config: TOML scenarios, Flower run-config overrides, clear errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg import config
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


# --- complete validation (issue 27) -------------------------------------------------------


def _scenario(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_every_numeric_field_has_a_range():
    import dataclasses

    from fedseg.config import RANGES

    sections = [
        config.DatasetConfig,
        config.FederationConfig,
        config.HospitalConfig,
        config.ModelConfig,
        config.TrainingConfig,
        config.PrivacyConfig,
        config.BaselineConfig,
        config.AttackConfig,
        config.RunConfig,
    ]
    for cls in sections:
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", int, float):
                assert f.name in RANGES.get(cls, {}), f"{cls.__name__}.{f.name} has no range"
        assert all(default_passes(cls, name) for name in RANGES.get(cls, {}))


def default_passes(cls, name: str) -> bool:
    """Every default is inside its own range (a range too tight would refuse the defaults)."""
    from fedseg.config import RANGES

    return getattr(cls(), name) in RANGES[cls][name]


# The audit's values that passed validation and failed late or silently: each is refused at
# load with the section and field named.
BAD_VALUES = [
    ("[model]\nimage_size = 0", "model.image_size"),
    ("[model]\nimage_size = -32", "model.image_size"),
    ("[training]\nae_lr = -0.001", "training.ae_lr"),
    ("[training]\numn_lr = -1.0", "training.umn_lr"),
    ("[training]\nfinetune_lr = -1e-3", "training.finetune_lr"),
    ("[baselines]\nlr = -0.1", "baselines.lr"),
    ("[training]\nae_epochs = -5", "training.ae_epochs"),
    ("[training]\numn_epochs_per_round = 0", "training.umn_epochs_per_round"),
    ("[training]\numn_epochs_per_round = -3", "training.umn_epochs_per_round"),
    ("[model]\nlatent_channels = 0", "model.latent_channels"),
    ("[model]\numn_width = 0", "model.umn_width"),
    ("[data]\nsynthetic_train = 0", "data.synthetic_train"),
    ("[data]\nsynthetic_test = -1", "data.synthetic_test"),
    ("[training]\naugment_copies = 0", "training.augment_copies"),
    ("[training]\nthreads = 0", "training.threads"),
    ('[data]\nkind = "pairs"\npath = "nowhere"', "data.path: folder not found"),
    ('[data]\nlabel_values = ["a", "b"]', r"data.label_values\[0\] must be int"),
    ('[model]\nae_widths = [16, 32, "wide", 64, 96]', r"model.ae_widths\[2\] must be int"),
    ("[training]\nae_lr = inf", "training.ae_lr"),
    ("[federation]\ntest_fraction = nan", "federation.test_fraction"),
    ("[data]\nchannels = 2", "data.channels"),
    ('[data]\nchannels = "purple"', "data.channels must be a number or one of"),
    ("[data]\nmask_threshold = -3", "data.mask_threshold"),
    ("[data]\nlabel_colors = [[0, 0, 0], [255, 0]]", "RGB triplet"),
    ("[data]\nlabel_colors = [[0, 0, 0], [300, 0, 0]]", "data.label_colors"),
    ("[data]\nlabel_values = [0, 255]\nmask_threshold = 127", "alternatives"),
    ("[attack]\nkey_recovery_pairs = [1, 0]", "attack.key_recovery_pairs"),
    ("[baselines]\nunet_channels = [16, true]", r"baselines.unet_channels\[1\] must be int"),
    ('[[hospitals]]\nname = "a"\ntamper = [1]', r"hospitals\[0\].tamper\[0\] must be str"),
    ("[[hospitals]]\nspeed = 0.0", r"hospitals\[0\]"),
]


@pytest.mark.parametrize(("text", "named"), BAD_VALUES)
def test_bad_values_are_refused_at_load_naming_the_field(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named):
        load_config(_scenario(tmp_path, text + "\n"))


def test_missing_data_files_are_named(tmp_path):
    (tmp_path / "d").mkdir()
    path = _scenario(tmp_path, '[data]\npath = "d"\nspacing_csv = "none.csv"\n')
    with pytest.raises(ConfigError, match="data.spacing_csv: file not found"):
        load_config(path)
    # a deployed node's scenario may name data that is not on its machine: not checked there
    assert load_config(path, check_files=False).data.kind == "pairs"


def test_channels_names_and_kind_from_the_files(tmp_path):
    (tmp_path / "vols" / "images").mkdir(parents=True)
    (tmp_path / "vols" / "images" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "vols" / "labels").mkdir()
    cfg = load_config(_scenario(tmp_path, '[data]\npath = "vols"\nchannels = "grey"\n'))
    assert cfg.data.kind == "nifti" and cfg.data.channels == 1
    with pytest.raises(ConfigError, match="channels = 3 needs colour image files"):
        load_config(_scenario(tmp_path, '[data]\npath = "vols"\nchannels = "rgb"\n'))


def test_error_text_is_printed_verbatim():
    from rich.console import Console

    from fedseg.config import error_text

    console = Console(record=True, width=200)
    console.print(error_text("unknown key(s) in [training]: ae_epoch"))
    assert "error: unknown key(s) in [training]: ae_epoch" in console.export_text()
