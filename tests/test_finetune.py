"""Split-learning fine-tuning at library level: the split gradients are the joint ones, the
loss falls, bad gradients are refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.checkpoint import CheckpointMismatch, describe_resume, fingerprint, save_private
from fedseg.config import ConfigError
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.finetune import KeptFinetuners, SiteFinetuner, finetune_steps
from fedseg.hospital import FINETUNED
from fedseg.models.autoencoder import SkipAutoencoder
from fedseg.privacy.keys import KeyRing, read_key_file, write_key_file
from fedseg.privacy.leakcheck import find_key_material
from fedseg.site import (
    SiteModels,
    query_chunk,
    segment_mapped,
    site_models_path,
    site_transform,
    stream_length,
    train_site,
    training_chunk,
)
from fedseg.training import nhwc, segmentation_loss
from fedseg.wire import GRAD_DTYPE, unpack
from simulations.engine import simulate
from simulations.in_process import split_train
from tests.helpers import small_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    cfg = small_config(
        tmp, 2, [8, 16, 16, 32, 32], 32, ae_epochs=4, umn_epochs_per_round=2, batch_size=4
    )
    cfg.privacy.key_dir = str(tmp / "keys")
    cfg.validate()
    sites = load_federation(cfg)
    models, transforms = {}, {}
    for s in sites:
        write_key_file(tmp / "keys" / f"{s.name}.key")
        transforms[s.name] = site_transform(cfg, tmp / "keys" / f"{s.name}.key", create=True)
        models[s.name], _ = train_site(cfg, s.train)
    coord = Coordinator(cfg, [s.name for s in sites], key_dir=cfg.privacy.key_dir)
    for s in sites:
        n = stream_length(s.train, cfg.training.augment_copies)
        coord.add_chunk(
            s.name, training_chunk(cfg, s.train, models[s.name], transforms[s.name], 0, n)
        )
    coord.train_round()
    return cfg, sites, models, transforms, coord


def _fresh(setup, epochs: int | None = None):
    cfg, sites, models, transforms, coord = setup
    models = copy.deepcopy(models)
    coord = copy.deepcopy(coord)
    if epochs is not None:  # the phase takes its epochs from the config, as in a run
        cfg = copy.deepcopy(cfg)
        cfg.training.finetune_epochs = epochs
        coord.cfg = cfg
    tuners = {
        s.name: SiteFinetuner(cfg, s.train, models[s.name], transforms[s.name]) for s in sites
    }
    return cfg, sites, tuners, coord


def _wire(latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """The wire's fp16 rounding, passing gradients straight through: the unsplit network with
    it is what split training computes exactly (without it, the rounding alone moved the
    gradients' cosine to 0.98-0.99 on some runs)."""
    return [z + (z.detach().half().float() - z.detach()) for z in latents]


def test_split_gradient_equals_the_joint_gradient(setup):
    """What the server sends back is d loss / d keyed image latents of the unsplit network."""
    cfg, sites, tuners, coord = _fresh(setup)
    site = sites[0].name
    tuner = tuners[site]
    joint_models = copy.deepcopy(tuner.models)
    joint_umn = copy.deepcopy(coord.umn)

    mapped = coord.finetune_forward(site, tuner.forward(0, 0))
    grad_out, loss = tuner.decode_and_backward(0, 0, 1, mapped)
    answers, refused = coord.finetune_backward({site: grad_out}, 0, 1)
    assert not refused
    split_grad = unpack(answers[site], "grad", tuner.shapes, dtype=GRAD_DTYPE)

    x, y = tuner._batch(0, 0)
    joint_models.image_ae.encoder.train()
    keyed = [
        z.detach().requires_grad_()
        for z in tuner.transform.forward(joint_models.image_ae.encoder(nhwc(x)), "image")
    ]
    joint_umn.train()
    mapped = _wire(joint_umn(_wire(keyed), joint_umn.site_index(site)))
    out = tuner.transform.inverse(mapped, "mask")
    joint_models.mask_ae.decoder.train()
    logits = joint_models.mask_ae.decoder(out)
    joint_loss = segmentation_loss()(logits, y[:, None])
    joint_grad = torch.autograd.grad(joint_loss, keyed)

    assert loss == pytest.approx(joint_loss.item(), rel=1e-4)
    for s, (a, b) in enumerate(zip(split_grad, joint_grad, strict=True)):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.9999, f"scale {s}: cosine {cos:.6f} between split and joint gradients"
        assert torch.linalg.norm(a) == pytest.approx(torch.linalg.norm(b).item(), rel=1e-3)


def _local_skip_tuner(setup):
    cfg, sites, _, coord = _fresh(setup)
    cfg = copy.deepcopy(cfg)
    cfg.model.local_skips = True
    site = sites[0]
    torch.manual_seed(0)
    models = SiteModels.build(cfg, site.train.num_classes)
    transform = site_transform(cfg, Path(cfg.privacy.key_dir) / f"{site.name}.key", create=True)
    return cfg, site, SiteFinetuner(cfg, site.train, models, transform), coord


@pytest.mark.parametrize("reload", [False, True])
def test_with_local_skips_the_encoder_steps_on_the_joint_gradient(setup, reload):
    """model.local_skips: the decoder's loss reaches the encoder's first stages at the site
    (step 3) as well as through the server (step 4); the one encoder step takes their sum,
    which is the gradient of the unsplit network. Whether step 4 goes back through step 1's
    kept encoder pass or (a fine-tuner reloaded from disk) recomputes it."""
    cfg, site, tuner, coord = _local_skip_tuner(setup)
    encoder = tuner.models.image_ae.encoder
    joint = copy.deepcopy(tuner.models)
    joint_umn = copy.deepcopy(coord.umn)

    stepped = {}
    real_step = tuner.encoder_opt.step

    def record_then_step(*args, **kwargs):
        stepped.update({n: p.grad.clone() for n, p in encoder.named_parameters()})
        return real_step(*args, **kwargs)

    tuner.encoder_opt.step = record_then_step
    mapped = coord.finetune_forward(site.name, tuner.forward(0, 0))
    grad_out, _ = tuner.decode_and_backward(0, 0, 1, mapped)
    assert set(tuner.local_grads) == {(0, 0)}
    assert list(tuner._passes) == [(0, 0)]  # step 1's, kept
    if reload:  # the stash survives a save and reload between the two messages
        tuner.load_state(copy.deepcopy(tuner.state()))
        assert not tuner._passes
    answers, refused = coord.finetune_backward({site.name: grad_out}, 0, 1)
    assert not refused
    tuner.backward_encoder(0, 0, 1, answers[site.name])
    assert not tuner.local_grads and not tuner._passes

    x, y = tuner._batch(0, 0)
    joint.image_ae.encoder.train()
    joint.mask_ae.decoder.train()
    joint_umn.train()
    keyed = _wire(tuner.transform.forward(joint.image_ae.encoder(nhwc(x)), "image"))
    mapped = _wire(joint_umn(keyed, joint_umn.site_index(site.name)))
    out = tuner.transform.inverse(mapped, "mask")
    local = joint.image_ae.encoder.local_features(nhwc(x))
    logits = joint.mask_ae.decoder(out, local)
    loss = segmentation_loss()(logits, y[:, None])
    names = [n for n, _ in joint.image_ae.encoder.named_parameters()]
    grads = torch.autograd.grad(loss, list(joint.image_ae.encoder.parameters()))
    for stage in ("stages.0.", "stages.4."):  # a local-skip stage and a server-only one
        a = torch.cat([stepped[n].flatten() for n in names if n.startswith(stage)])
        b = torch.cat(
            [g.flatten() for n, g in zip(names, grads, strict=True) if n.startswith(stage)]
        )
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
        assert cos > 0.9999, f"{stage}: cosine {cos:.6f} between split and joint gradients"
        assert torch.linalg.norm(a) == pytest.approx(torch.linalg.norm(b).item(), rel=1e-3)


def test_pipelined_a_batch_goes_back_through_the_weights_that_encoded_it(setup):
    """training.finetune_pipeline: a site encodes its next batch before the encoder steps on
    this one's gradient. That batch's gradient then goes back through the weights it was
    encoded with (kept by its pass's graph) with its own local-skip gradient, and no batch is
    encoded twice."""
    cfg, site, tuner, coord = _local_skip_tuner(setup)
    encoder = tuner.models.image_ae.encoder
    encoded_with = copy.deepcopy(encoder)  # the weights both batches are encoded with
    passes = []
    encoder.stages[0].register_forward_hook(lambda *_: passes.append(1))
    stepped = []
    real_step = tuner.encoder_opt.step

    def record_then_step(*args, **kwargs):
        stepped.append([p.grad.clone() for p in encoder.parameters()])
        return real_step(*args, **kwargs)

    tuner.encoder_opt.step = record_then_step
    # The order of a pipelined run (fedseg.split_training.answer_backward): a backward exchange
    # decodes its batch, takes the last batch's encoder step, then encodes the next batch.
    grad0, _ = tuner.decode_and_backward(
        0, 0, 1, coord.finetune_forward(site.name, tuner.forward(0, 0))
    )
    latents1 = tuner.forward(0, 1)  # encoded before batch 0's encoder step
    answers, _ = coord.finetune_backward({site.name: grad0}, 0, 1)
    grad1, _ = tuner.decode_and_backward(0, 1, 1, coord.finetune_forward(site.name, latents1))
    local1 = [g.clone() for g in tuner.local_grads[(0, 1)]]
    tuner.backward_encoder(0, 0, 1, answers[site.name])
    answers, _ = coord.finetune_backward({site.name: grad1}, 0, 1)
    tuner.backward_encoder(0, 1, 1, answers[site.name])
    assert len(passes) == 2 and len(stepped) == 2 and not tuner._passes

    server1 = unpack(answers[site.name], "grad", tuner.shapes, dtype=GRAD_DTYPE)
    x, _ = tuner._batch(0, 1)

    def gradient(net: torch.nn.Module) -> list[torch.Tensor]:
        net.train()
        latents, local = net.encode(nhwc(x))
        keyed = tuner.transform.forward(latents, "image")
        return list(
            torch.autograd.grad([*keyed, *local], list(net.parameters()), [*server1, *local1])
        )

    for got, want in zip(stepped[1], gradient(encoded_with), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    moved = gradient(copy.deepcopy(encoder))  # the weights after batch 0's step: not these
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(stepped[1], moved, strict=True))


def test_a_local_skip_decoder_needs_the_images_it_segments(setup):
    cfg, site, tuner, coord = _local_skip_tuner(setup)
    query = query_chunk(site.test, tuner.models, tuner.transform, 0, 3)
    mapped = coord.map_query(site.name, query)
    with pytest.raises(ValueError, match="local skips"):
        segment_mapped(cfg, tuner.models, tuner.transform, mapped)
    with pytest.raises(ValueError, match="2 images for 3"):
        segment_mapped(cfg, tuner.models, tuner.transform, mapped, site.test.images[:2])
    pred = segment_mapped(cfg, tuner.models, tuner.transform, mapped, site.test.images[:3])
    assert pred.shape == site.test.masks[:3].shape
    # The images matter: other images give another segmentation of the same latents.
    other = segment_mapped(cfg, tuner.models, tuner.transform, mapped, -site.test.images[:3])
    assert not np.array_equal(pred, other)


@pytest.mark.parametrize("input_norm", [False, True])
def test_decoder_input_norm_removes_the_offset_a_key_bias_leaves(input_norm):
    """Client custody un-keys the server's output as R^T (out - b): an offset per channel that
    the server cannot learn away without b. With input_norm the decoder does not see it."""
    torch.manual_seed(0)
    decoder = SkipAutoencoder(3, 3, [8, 16, 16, 32, 32], 8, True, input_norm).decoder.train()
    latents = [torch.randn(4, 8, s, s) for s in (8, 4, 2)]
    offset = [torch.randn(1, 8, 1, 1) for _ in latents]
    with torch.no_grad():
        plain = decoder(latents)
        shifted = decoder([z + o for z, o in zip(latents, offset, strict=True)])
    gap = float((plain - shifted).abs().max())
    if input_norm:
        assert gap < 1e-4
    else:  # zero padding at the borders of 2x2 to 8x8 maps turns an offset into a pattern
        assert gap > 1e-2


def test_local_skips_need_split_training(tmp_path):
    cfg = small_config(tmp_path, 2, [8, 16, 16, 32, 32], 32)
    cfg.model.local_skips = True
    cfg.training.finetune_epochs = 0
    with pytest.raises(
        ConfigError, match=r"model.local_skips needs split training \(training.finetune_epochs"
    ):
        cfg.validate()


def test_finetuning_lowers_the_training_loss_and_changes_only_the_trained_parts(setup):
    cfg, sites, tuners, coord = _fresh(setup, epochs=8)
    site = sites[0].name
    before = {k: v.clone() for k, v in tuners[site].models.state().items()}
    umn_before = copy.deepcopy(coord.umn.state_dict())
    losses = split_train(coord, tuners)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0], losses
    after = tuners[site].models.state()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("image.encoder.") for k in changed)
    assert any(k.startswith("mask.decoder.") for k in changed)
    # The image decoder and mask encoder are not on the path: untouched.
    assert not any(k.startswith(("image.decoder.", "mask.encoder.")) for k in changed)
    assert any(not torch.equal(umn_before[k], v) for k, v in coord.umn.state_dict().items())


def test_batches_are_reproducible_so_the_encoder_pass_can_be_recomputed(setup):
    _, _, tuners, _ = _fresh(setup)
    tuner = next(iter(tuners.values()))
    (x1, y1), (x2, y2) = tuner._batch(3, 1), tuner._batch(3, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(tuner._batch(4, 1)[0], x1)
    with pytest.raises(ValueError, match="step 99"):
        tuner._batch(0, 99)


def test_a_kept_finetuner_is_handed_back_only_while_its_file_is_the_one_it_saved(setup, tmp_path):
    _, sites, tuners, _ = _fresh(setup)
    mine, other = (tuners[s.name] for s in sites)
    path, kept = tmp_path / "finetune-state.pt", KeptFinetuners()

    def save_and_keep(context="run-a"):
        save_private(mine.state(), path)
        kept.keep(path, mine, context)

    save_and_keep()
    assert kept.take(path, "run-a") is mine
    assert kept.take(path, "run-a") is None, (
        "handed out twice: a failed handler's half-stepped copy could be reused"
    )
    save_and_keep()
    assert kept.take(path, "run-b") is None, "another config or key file"
    save_and_keep()
    save_private(other.state(), path)  # another process served the site since
    assert kept.take(path, "run-a") is None
    save_and_keep()
    path.unlink()
    assert kept.take(path, "run-a") is None
    assert kept.take(tmp_path / "elsewhere.pt", "run-a") is None


def test_bad_gradients_are_refused_by_name_and_the_others_still_train(setup):
    cfg, sites, tuners, coord = _fresh(setup)
    a, b = sites[0].name, sites[1].name
    grads = {}
    for s in (a, b):
        mapped = coord.finetune_forward(s, tuners[s].forward(0, 0))
        grads[s], _ = tuners[s].decode_and_backward(0, 0, 1, mapped)
    grads[b] = {**grads[b], "grad0": grads[b]["grad0"].astype(np.float16)}
    answers, refused = coord.finetune_backward(grads, 0, 1)
    assert set(answers) == {a}
    assert "grad0" in refused[b] and "float32" in refused[b]

    mapped = coord.finetune_forward(a, tuners[a].forward(0, 1))
    grad, _ = tuners[a].decode_and_backward(0, 1, 1, mapped)
    nan = {**grad, "grad1": np.full_like(grad["grad1"], np.nan)}
    answers, refused = coord.finetune_backward({a: nan}, 0, 1)
    assert not answers and "grad1" in refused[a] and "NaN" in refused[a]
    _, refused = coord.finetune_backward({"nobody": grad}, 0, 1)
    assert "mapped no batch" in refused["nobody"]


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune-flower")
    cfg = small_config(
        tmp / "out", 2, [8, 8, 16, 16, 16], 16, ae_epochs=2, umn_epochs_per_round=1, batch_size=4
    )
    cfg.training.finetune_epochs = 2
    cfg.privacy.audit_dir = str(tmp / "audit")
    cfg.validate()
    simulate(cfg)
    return cfg


@pytest.mark.slow
def test_flower_run_fine_tunes_every_site_and_says_so(flower_run):
    cfg = flower_run
    out = Path(cfg.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"hospital-1", "hospital-2"}
    assert not metrics["dropped"]
    assert len(metrics["finetune_losses"]) == 2 and all(np.isfinite(metrics["finetune_losses"]))
    assert metrics["timing_s"]["finetuning"] > 0
    assert torch.load(out / "checkpoints" / "umn.pt", weights_only=True)["finetuned"] == 2
    for site in ("hospital-1", "hospital-2"):
        saved = site_models_path(out, site)
        assert saved.with_suffix(".config").read_text().endswith(FINETUNED)
        assert not saved.with_name("finetune-state.pt").exists()  # removed when done


@pytest.mark.slow
def test_fine_tuning_messages_carry_gradients_and_no_key_material(flower_run):
    cfg = flower_run
    audit = Path(cfg.privacy.audit_dir)
    steps = finetune_steps(cfg.data.synthetic_train, cfg.training.batch_size)
    for site in ("hospital-1", "hospital-2"):
        secret = read_key_file(Path(cfg.out_dir) / "keys" / f"{site}.key")
        ring = KeyRing.from_secret(secret, cfg.model.latent_channels)
        forward = sorted((audit / site).glob("*_train_finetune_forward.npz"))
        backward = sorted((audit / site).glob("*_train_finetune_backward.npz"))
        # Pipelined (the default), a step's backward exchange brings the next batch's latents:
        # a forward request opens each epoch and one ends the phase.
        per_epoch = 1 if cfg.training.finetune_pipeline else steps
        epochs = cfg.training.finetune_epochs
        assert len(forward) == per_epoch * epochs + 1 and len(backward) == steps * epochs
        for dump in forward + backward:
            with np.load(dump) as payload:
                arrays = {k: payload[k] for k in payload.files if k != "__texts__"}
            assert find_key_material(arrays, [], secret, ring) == [], dump.name
        with np.load(backward[0]) as payload:
            assert payload["grad.grad0"].dtype == np.float32


@pytest.mark.slow
def test_a_finished_fine_tuning_is_not_resumed_but_adding_one_is_allowed(flower_run):
    cfg = copy.deepcopy(flower_run)
    cfg.resume = True
    with pytest.raises(CheckpointMismatch, match="fine-tuning already finished"):
        describe_resume(cfg)
    # Fine-tuning comes after every checkpointed phase, so its settings are not in the
    # fingerprint the sites tag their AEs with: a stopped run may add or change it on resume.
    before = fingerprint(cfg)
    cfg.training.finetune_epochs, cfg.training.finetune_lr = 7, 1e-3
    assert fingerprint(cfg) == before


def test_one_umn_pass_and_one_step_serve_all_sites_batches(setup):
    """Step 2 maps every site's batch in one pass of the UMN, and step 4 takes one optimizer
    step for all of them; each site still gets what its batch alone would have given it (the
    UMN has no batch statistics), and the gradient of its own loss."""
    cfg, sites, tuners, coord = _fresh(setup)
    names = [s.name for s in sites]
    alone = {n: copy.deepcopy(coord) for n in names}
    batches = {n: tuners[n].forward(0, 0) for n in names}
    mapped, refused = coord.finetune_map(batches)
    assert not refused and set(mapped) == set(names)
    grads = {}
    for n in names:
        own = alone[n].finetune_forward(n, batches[n])
        for a, b in zip(
            unpack(mapped[n], "mask", tuners[n].shapes),
            unpack(own, "mask", tuners[n].shapes),
            strict=True,
        ):
            assert torch.allclose(a, b, atol=2e-3 * float(b.abs().max()))
        grads[n], _ = tuners[n].decode_and_backward(0, 0, 1, mapped[n])
    answers, refused = coord.finetune_backward(grads, 0, 1)
    assert not refused and set(answers) == set(names)
    for n in names:
        own, _ = alone[n].finetune_backward({n: grads[n]}, 0, 1)
        for a, b in zip(
            unpack(answers[n], "grad", tuners[n].shapes, dtype=GRAD_DTYPE),
            unpack(own[n], "grad", tuners[n].shapes, dtype=GRAD_DTYPE),
            strict=True,
        ):
            assert torch.allclose(a, b, atol=1e-3 * float(b.abs().max()))
    opt = coord._finetune_opt
    assert opt is not None
    steps = {int(state["step"]) for state in opt.state.values()}
    assert steps == {1}, f"one UMN step for the sites' batches, not {steps}"
