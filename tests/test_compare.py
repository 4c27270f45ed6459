"""fedseg compare: runs grouped by a config value, with spread and paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.compare import compare_runs
from fedseg.config import RunConfig


def _run(root: Path, name: str, custody: str, seed: int, dice: float, **data) -> Path:
    cfg = RunConfig()
    cfg.privacy.custody = custody
    cfg.training.seed = seed
    cfg.out_dir = str(root / name)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    mean = {"dice": dice, "hd95": 10.0 + seed, "asd": 4.0, "units": "px"}
    folder = root / name
    folder.mkdir()
    metrics = {"config": cfg.to_dict(), "mean": mean}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_groups_runs_and_pairs_them_by_seed(tmp_path):
    runs = [
        _run(tmp_path, "c0", "client", 0, 0.719),
        _run(tmp_path, "c1", "client", 1, 0.707),
        _run(tmp_path, "s0", "server", 0, 0.705),
        _run(tmp_path, "s1", "server", 1, 0.715),
    ]
    comparison = compare_runs(runs)
    client, server = comparison.groups
    assert (client.value, server.value) == ("client", "server")
    assert client.mean("dice") == pytest.approx(0.713)
    assert client.sd("dice") == pytest.approx(0.012 / 2**0.5)
    assert client.mean("hd95") == pytest.approx(10.5)
    diff, se = comparison.difference(client, server)
    assert diff == pytest.approx(0.003)
    assert se == pytest.approx((client.sd("dice") ** 2 / 2 + server.sd("dice") ** 2 / 2) ** 0.5)
    paired = comparison.paired(client, server)
    assert [s for s, _ in paired] == [0, 1]
    assert [d for _, d in paired] == pytest.approx([0.014, -0.008])
    assert comparison.varies == ["training.seed"]
    text = comparison.to_markdown()
    assert "| client | 2 | 0, 1 | 0.713 (0.008) | 0.719 / 0.707 |" in text
    assert "client - server: mean Dice +0.3 pp" in text
    assert "by seed 0: +1.4, 1: -0.8" in text


def test_a_single_run_has_no_spread_and_repeated_seeds_are_not_paired(tmp_path):
    runs = [
        _run(tmp_path, "c0", "client", 0, 0.72),
        _run(tmp_path, "s0", "server", 0, 0.70),
        _run(tmp_path, "s0b", "server", 0, 0.71),
    ]
    comparison = compare_runs(runs)
    client, server = comparison.groups
    assert client.sd("dice") is None
    assert comparison.difference(client, server) == (pytest.approx(0.015), None)
    assert comparison.paired(client, server) == []


def test_runs_on_other_test_images_are_refused(tmp_path):
    a = _run(tmp_path, "a", "client", 0, 0.7, path="/data/us-nerve")
    b = _run(tmp_path, "b", "server", 0, 0.7, path="/data/hc18")
    with pytest.raises(ValueError, match="different test sets: 'data.path'"):
        compare_runs([a, b])


def test_bad_folders_and_keys_are_named(tmp_path):
    good = _run(tmp_path, "good", "client", 0, 0.7)
    with pytest.raises(FileNotFoundError, match="missing"):
        compare_runs([good, tmp_path / "missing"])
    with pytest.raises(ValueError, match="has no 'privacy.custodian'"):
        compare_runs([good], by="privacy.custodian")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/metrics.json: not valid JSON"):
        compare_runs([good, broken])
    nan = _run(tmp_path, "nan", "server", 0, 0.7)
    metrics = json.loads((nan / "metrics.json").read_text())
    metrics["mean"]["dice"] = None
    (nan / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="nan/metrics.json: mean Dice is missing"):
        compare_runs([good, nan])


def test_cli_prints_the_groups_and_writes_markdown(tmp_path):
    runs = [_run(tmp_path, "c0", "client", 0, 0.72), _run(tmp_path, "s0", "server", 0, 0.70)]
    out = tmp_path / "compare.md"
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "client - server: mean Dice +2.0 pp" in result.output
    assert "| server | 1 | 0 | 0.700 (–) | 0.700 |" in out.read_text()
    result = CliRunner().invoke(app, ["compare", str(runs[0]), str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no metrics.json in" in result.output


def test_a_run_made_before_a_config_field_existed_counts_with_its_default(tmp_path):
    old = _run(tmp_path, "old", "client", 0, 0.71)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["config"]["training"]["finetune_pipeline"]  # an older fedseg's run
    (old / "metrics.json").write_text(json.dumps(metrics))
    new = _run(tmp_path, "new", "client", 0, 0.72)
    metrics = json.loads((new / "metrics.json").read_text())
    metrics["config"]["training"]["finetune_pipeline"] = False
    (new / "metrics.json").write_text(json.dumps(metrics))
    groups = compare_runs([old, new], by="training.finetune_pipeline").groups
    assert [(g.value, g.dice) for g in groups] == [("True", [0.71]), ("False", [0.72])]
