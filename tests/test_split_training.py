"""Split training is written once (fedseg/split_training.py): a federation through Flower and
Ray, and the same phase with in-memory fine-tuners (simulations/in_process.py), are one
computation, so what a study measures in-process is what a federation runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.config import ConfigError, RunConfig, TrainingConfig
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.finetune import SiteFinetuner, split_epochs
from fedseg.privacy.keys import read_key_file, simulated_secret
from fedseg.site import SiteModels, site_blinder, site_models_path, site_transform, train_site
from simulations.in_process import InProcessSites, split_train
from tests.helpers import blind_config


def _in_process(cfg, key: Path, create: bool = False):
    tuners = {}
    for s in load_federation(cfg):
        models, _ = train_site(cfg, s.train)  # the seeded initialisation a hospital starts from
        transform = site_transform(cfg, key, create=create)
        blinder = site_blinder(cfg, key, s.name, create=create)
        tuners[s.name] = SiteFinetuner(cfg, s.train, models, transform, blinder)
    return tuners, Coordinator(cfg, list(tuners))


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [False, True])
def test_flower_and_in_process_split_training_are_one_computation(tmp_path, pipeline):
    from simulations.engine import simulate

    cfg = blind_config(tmp_path / "flower", sites=2, epochs=2)
    cfg.training.finetune_pipeline = pipeline
    cfg.training.threads = 1
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
    simulate(cfg.validate())
    out = Path(cfg.out_dir)
    flower = json.loads((out / "metrics.json").read_text())["finetune_losses"]

    torch.set_num_threads(1)
    twin = blind_config(tmp_path / "in-process", sites=2, epochs=2)
    twin.training.finetune_pipeline = pipeline
    tuners, coordinator = _in_process(twin, out / "keys" / "federation.key")
    losses = split_train(coordinator, tuners)

    assert len(losses) == 2 and losses[1] != losses[0]
    np.testing.assert_allclose(losses, flower, rtol=1e-5)
    for site, tuner in tuners.items():
        saved = SiteModels.load(cfg, site_models_path(out, site))[0].state()
        for name, value in tuner.models.state().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, saved[name], rtol=1e-4, atol=1e-5)


def test_in_process_split_training_repeats_with_one_seed(tmp_path):
    """A study's sites make their keys from the run's seed, as a simulated federation's do, so
    two runs with one seed give one result (with random keys, us-nerve's final Dice moved by
    3.7 pp between two runs of one config), and a third seed gives another."""
    torch.set_num_threads(1)

    def run(folder: str, seed: int = 0):
        cfg = blind_config(tmp_path / folder, sites=2, epochs=2)
        cfg.training.seed = seed
        key = tmp_path / folder / "keys" / "federation.key"
        tuners, coordinator = _in_process(cfg, key, create=True)
        assert read_key_file(key) == simulated_secret(seed, "federation")
        return split_train(coordinator, tuners), tuners["hospital-1"].models.state()

    (losses, state), (again, state_again) = run("a"), run("b")
    assert losses == again
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert run("c", seed=1)[0] != losses


def test_a_failing_site_drops_out_and_the_others_finish(tmp_path):
    """Not strict (a federation's rule): a site that raises fails its step, drops out, and
    the phase goes on with the rest."""
    cfg = blind_config(tmp_path, sites=3, epochs=2)
    key = tmp_path / "keys" / "federation.key"
    tuners, coordinator = _in_process(cfg, key, create=True)
    broken = tuners["hospital-3"]

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    broken.decode_and_backward = fail
    link = InProcessSites(tuners, strict=False)
    from fedseg.split_training import SplitTraining

    sizes = {n: len(t.data) for n, t in tuners.items()}
    losses = SplitTraining(coordinator, link, sizes).run()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert list(link.dropped) == ["hospital-3"] and "disk full" in link.dropped["hospital-3"]
    a, b = (tuners[n].shared_state() for n in ("hospital-1", "hospital-2"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the two left are one model


def test_strict_in_process_runs_raise_the_sites_error(tmp_path):
    cfg = blind_config(tmp_path, sites=2, epochs=1)
    key = tmp_path / "keys" / "federation.key"
    tuners, coordinator = _in_process(cfg, key, create=True)
    honest = tuners["hospital-2"].forward
    tuners["hospital-2"].forward = lambda *a: {k: v * np.inf for k, v in honest(*a).items()}
    with pytest.raises(ValueError, match="hospital-2: reply refused"):
        split_train(coordinator, tuners)


@pytest.mark.parametrize(
    ("epochs", "steps", "sizes", "expected"),
    [
        (-1, 1200, [68, 68, 68], 150),  # us-nerve: 8 steps an epoch at batch 8
        (-1, 1200, [89, 89, 89], 110),  # hc18: 11 steps
        (-1, 1200, [30, 89, 10], 110),  # the site with the most steps sets the count
        (-1, 10, [3], 10),  # a site smaller than a batch still takes one step an epoch
        (400, 1200, [68], 400),  # an explicit count is kept
        (0, 1200, [68], 0),  # 0: no split training (the paper preset)
    ],
)
def test_split_epochs_follow_the_data(epochs, steps, sizes, expected):
    training = TrainingConfig(finetune_epochs=epochs, finetune_optimizer_steps=steps)
    assert split_epochs(training, sizes) == expected


def test_the_phase_takes_its_epochs_from_the_optimiser_steps(tmp_path):
    torch.set_num_threads(1)
    cfg = blind_config(tmp_path, sites=2, epochs=-1)  # 8 images a site, batch 4: 2 steps
    cfg.training.finetune_optimizer_steps = 5
    tuners, coordinator = _in_process(cfg, tmp_path / "federation.key", create=True)
    seen = []
    losses = split_train(coordinator, tuners, lambda done, total, loss: seen.append(total))
    assert len(losses) == 3 and seen == [3, 3, 3]  # ceil(5 / 2)


def test_the_step_count_is_checked_by_name():
    cfg = RunConfig()
    cfg.training.finetune_optimizer_steps = 0
    with pytest.raises(ConfigError, match="finetune_optimizer_steps"):
        cfg.validate()
    cfg = RunConfig()
    cfg.training.finetune_epochs = -2
    with pytest.raises(ConfigError, match="finetune_epochs"):
        cfg.validate()
