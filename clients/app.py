"""Flower ClientApp: one hospital. Each handler decodes a message, calls fedseg, encodes a reply.

Message types (the server's strategies send them in this order):
- ``train.autoencoders``: register (sizes, class names, aggregate statistics); with the paper
  preset also train the image and mask AEs on local data and reply their losses.
- ``query.latents``: keyed fp16 latents for a chunk of the training stream or the test split.
- ``query.round``: one UMN round's participation (simulated hospitals): fresh keyed latents of
  the next items of the training stream, or a heartbeat; a profile's dropout fails it here.
- ``train.finetune_forward`` / ``train.finetune_backward`` (opt-in, ``training.finetune_epochs``):
  split-learning fine-tuning (fedseg/finetune.py): apply the server's gradient to the encoder
  and send the next batch's keyed latents; decode mapped latents and send the loss gradient
  (``training.finetune_pipeline``: then also apply the previous batch's encoder gradient and
  send the next batch's latents, one exchange a step).
  With ``training.finetune_share`` (in the site's own config) a forward request may also carry
  what to adopt, or ask for the site's shared encoder/decoder (``SHARE_STEP``): with ``blind``
  (the default) only as a masked vector, and the server's masked sum comes back to be unmasked.
- ``evaluate.segment``: decode the server's mapped latents; reply metrics only.
The trained AEs stay on the site's own disk (0600, never in ``context.state``, which a
simulation ships with every message); key material is never put in a reply, and a guard mod
checks every reply for it before it leaves.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseg.checkpoint import fingerprint, save_private
from fedseg.config import RunConfig, config_from_run_config, method_name
from fedseg.data.stats import site_statistics
from fedseg.deploy.runtime import resolve_scenario
from fedseg.finetune import BLINDED, FINAL_STEP, SHARE_STEP, SiteFinetuner, kept_finetuners
from fedseg.privacy.audit import guard_and_audit, numeric_lists
from fedseg.privacy.blind import mask_label
from fedseg.privacy.redact import SiteError, public_error
from fedseg.report import Examples, write_overlays
from fedseg.site import (
    SiteModels,
    SiteSetup,
    evaluate_predictions,
    pick_examples,
    query_chunk,
    resolve_site,
    segment_mapped,
    site_blinder,
    site_models_path,
    site_transform,
    train_site,
    training_chunk,
)
from simulations.profiles import fails_in_round, round_deadline, simulate_outage, slow_down

log = logging.getLogger("fedseg.client")
APP_DIR = Path(__file__).resolve().parents[1]  # the app as installed on this node
FINETUNED = "+finetuned"  # appended to a site's AE tag: not the AEs its kept latents came from


def check_finetune_share(run_cfg: RunConfig, site: str) -> None:
    """Fine-tuning weights are shared only if the site's own config says so."""
    if run_cfg.training.finetune_share == "none":
        raise PermissionError(
            f"site {site}: refusing to exchange encoder/decoder weights: this site's "
            "training.finetune_share is 'none'"
        )


def make_client_app(cfg: RunConfig | None = None, mods: tuple = ()) -> ClientApp:
    """``cfg`` given: the CLI's scenario; otherwise read from the Flower run config. ``mods``
    run outside the site's own (a simulation's adversary: simulations/adversary.py)."""

    def resolve(context: Context) -> tuple[RunConfig, SiteSetup]:
        run_cfg = cfg or config_from_run_config(resolve_scenario(dict(context.run_config), APP_DIR))
        torch.set_num_threads(run_cfg.training.threads)
        return run_cfg, resolve_site(run_cfg, dict(context.node_config))

    def outgoing_guard(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if reply.has_content():
            run_cfg, setup = resolve(context)
            arrays = {
                f"{rk}.{ak}": arr.numpy()
                for rk, rec in reply.content.array_records.items()
                for ak, arr in rec.items()
            }
            records = {
                **{f"config.{k}": v for k, v in reply.content.config_records.items()},
                **{f"metrics.{k}": v for k, v in reply.content.metric_records.items()},
            }
            texts = [json.dumps(dict(rec)) for rec in records.values()]
            for name, rec in records.items():  # a key row sent as a list of numbers
                arrays.update(numeric_lists(name, rec))
            guard_and_audit(
                run_cfg, setup.split.name, setup.key_file, msg.metadata.message_type, arrays, texts
            )
        return reply

    def public_errors(msg: Message, context: Context, call_next) -> Message:
        """A failure reaches the server as its kind and a short message without paths
        (fedseg/privacy/redact.py); the full error stays in this site's log."""
        try:
            return call_next(msg, context)
        except Exception as err:
            log.error("%s failed", msg.metadata.message_type, exc_info=True)
            raise SiteError(public_error(err)) from None

    def compute_speed(msg: Message, context: Context, call_next) -> Message:
        """A slow hospital (profile ``speed`` < 1) really takes longer to answer."""
        started = time.perf_counter()
        reply = call_next(msg, context)
        slow_down(resolve(context)[1].split.profile, time.perf_counter() - started)
        return reply

    app = ClientApp(mods=[*mods, public_errors, outgoing_guard, compute_speed])

    def load_models(run_cfg: RunConfig, setup: SiteSetup) -> SiteModels:
        """The site's current models, from its own disk. Not from ``context.state``: a
        simulation ships a node's context to its Ray actor and back with every message, and
        4.7 MB of weights each way was most of a split-training step's messaging."""
        path = site_models_path(setup.out_dir, setup.split.name)
        if not path.is_file():
            raise RuntimeError(f"site {setup.split.name}: no trained models yet ({path.name})")
        return SiteModels.load(run_cfg, path)[0]

    @app.train("autoencoders")
    def train_autoencoders(msg: Message, context: Context) -> Message:
        run_cfg, setup = resolve(context)
        site = setup.split
        site_transform(run_cfg, setup.key_file)  # creates the site's key on first use
        saved = site_models_path(setup.out_dir, site.name)
        reuse = bool(msg.content.config_records["config"].get("reuse", False))
        sizes = {"n_train": len(site.train), "n_test": len(site.test)}
        tag = saved.with_suffix(".config")
        if (
            # Fine-tuned AEs (tag + FINETUNED) no longer match the latents the server kept.
            reuse and saved.is_file() and tag.is_file() and tag.read_text() == fingerprint(run_cfg)
        ):
            # Resuming: the same AEs, so the latents the server kept still match this site.
            models, names = SiteModels.load(run_cfg, saved)
            if names != list(site.train.class_names):
                raise ValueError(f"{saved}: classes {names} != the data's {site.train.class_names}")
            log.info("%s: reloaded autoencoders from %s", site.name, saved)
            metrics = MetricRecord({**sizes, "reused": 1})
        else:
            log.info("%s: training autoencoders on %d images", site.name, len(site.train))
            models, stats = train_site(run_cfg, site.train)
            models.save(saved, site.train.class_names)
            tag.write_text(fingerprint(run_cfg))
            metrics = MetricRecord(
                {
                    **sizes,
                    "image_loss": stats.image_loss,
                    "mask_loss": stats.mask_loss,
                    "epochs": stats.epochs,
                    "seconds": stats.seconds,
                }
            )
        info = ConfigRecord(
            {
                "site": site.name,
                "class_names": list(site.train.class_names),
                # Aggregates only (sizes, class fractions, an intensity histogram).
                "stats_json": json.dumps(site_statistics(site.train, site.test)),
            }
        )
        return Message(RecordDict({"metrics": metrics, "site": info}), reply_to=msg)

    @app.query("latents")
    def latents(msg: Message, context: Context) -> Message:
        run_cfg, setup = resolve(context)
        request = msg.content.config_records["request"]
        split, start, stop = str(request["split"]), int(request["start"]), int(request["stop"])
        models = load_models(run_cfg, setup)
        transform = site_transform(run_cfg, setup.key_file)
        if split == "train":
            arrays = training_chunk(run_cfg, setup.split.train, models, transform, start, stop)
        elif split == "test":
            arrays = query_chunk(setup.split.test, models, transform, start, stop)
        else:
            raise ValueError(f"request.split must be 'train' or 'test', got {split!r}")
        return Message(RecordDict({"latents": to_record(arrays)}), reply_to=msg)

    @app.query("round")
    def umn_round(msg: Message, context: Context) -> Message:
        run_cfg, setup = resolve(context)
        request = msg.content.config_records["request"]
        rnd, start, stop = int(request["round"]), int(request["start"]), int(request["stop"])
        site = setup.split
        if fails_in_round(site.profile, run_cfg.federation.seed, site.index, rnd):
            simulate_outage(site.profile, site.name, rnd, float(request["deadline_s"]))
        content = RecordDict({"heartbeat": ConfigRecord({"site": site.name, "round": rnd})})
        if stop > start:
            models = load_models(run_cfg, setup)
            transform = site_transform(run_cfg, setup.key_file)
            arrays = training_chunk(run_cfg, site.train, models, transform, start, stop)
            content["latents"] = to_record(arrays)
        return Message(content, reply_to=msg)

    def tuner_context(run_cfg: RunConfig, setup: SiteSetup) -> tuple:
        return fingerprint(run_cfg), setup.key_file  # what a kept fine-tuner was built from

    def save_finetuner(tuner: SiteFinetuner, path: Path, run_cfg: RunConfig, setup: SiteSetup):
        save_private(tuner.state(), path)
        kept_finetuners().keep(path, tuner, tuner_context(run_cfg, setup))

    def finetuner(run_cfg: RunConfig, setup: SiteSetup, context: Context, start: bool):
        """The site's fine-tuning state: from its trained AEs at the start, else from its disk
        (weights and optimizer moments; 0600, never sent) or this process's copy of it."""
        path = finetune_state_path(setup)
        tuner = kept_finetuners().take(path, tuner_context(run_cfg, setup))
        if tuner is not None and not start:
            return tuner, path
        if start:
            models = load_models(run_cfg, setup)
        elif path.is_file():  # its weights come from the state file: no need to load them twice
            models = SiteModels.build(run_cfg, setup.split.train.num_classes)
        else:
            raise RuntimeError(f"site {setup.split.name}: no fine-tuning in progress ({path})")
        transform = site_transform(run_cfg, setup.key_file)
        blinder = site_blinder(run_cfg, setup.key_file, setup.split.name)
        tuner = SiteFinetuner(run_cfg, setup.split.train, models, transform, blinder)
        if not start:
            tuner.load_state(torch.load(path, weights_only=True))
        return tuner, path

    @app.train("finetune_forward")
    def finetune_forward(msg: Message, context: Context) -> Message:
        run_cfg, setup = resolve(context)
        request = msg.content.config_records["request"]
        epoch, epochs, step = (int(request[k]) for k in ("epoch", "epochs", "step"))
        tuner, path = finetuner(run_cfg, setup, context, start=bool(request["start"]))
        if "grad" in msg.content.array_records:
            grad = arrays_of(msg.content.array_records["grad"])
            tuner.backward_encoder(
                int(request["grad_epoch"]), int(request["grad_step"]), epochs, grad
            )
        if "weights" in msg.content.array_records:  # the shared model (average)
            check_finetune_share(run_cfg, setup.split.name)
            tuner.adopt(msg.content.array_records["weights"].to_torch_state_dict())
        if BLINDED in msg.content.array_records:  # the masked sum of the sites' weights
            label = mask_label(msg.metadata.run_id, int(request["blind_epoch"]))
            sites = [str(s) for s in request["blind_sites"]]
            tuner.adopt_blinded(msg.content.array_records[BLINDED]["sum"].numpy(), label, sites)
        content = RecordDict()
        if step == SHARE_STEP:
            check_finetune_share(run_cfg, setup.split.name)
            share_round = int(request.get("share_epoch", epoch)) + 1
            site = setup.split
            if fails_in_round(site.profile, run_cfg.federation.seed, site.index, share_round):
                simulate_outage(site.profile, site.name, share_round, round_deadline(run_cfg))
            if run_cfg.training.finetune_share == "blind":
                if "share_epoch" not in request:
                    raise PermissionError(
                        f"site {setup.split.name}: training.finetune_share is 'blind': its "
                        "weights leave only masked, and the server asked for them in the clear"
                    )
                label = mask_label(msg.metadata.run_id, int(request["share_epoch"]))
                content[BLINDED] = to_record({"sum": tuner.blinded_state(label)})
            else:
                content["weights"] = ArrayRecord(tuner.shared_state())
                content["metrics"] = MetricRecord({"num-examples": len(setup.split.train)})
            save_finetuner(tuner, path, run_cfg, setup)
        elif step == FINAL_STEP:  # the end: the fine-tuned AEs become the site's AEs
            saved = site_models_path(setup.out_dir, setup.split.name)
            tuner.models.save(saved, setup.split.train.class_names)
            saved.with_suffix(".config").write_text(fingerprint(run_cfg) + FINETUNED)
            path.unlink(missing_ok=True)
            content["done"] = ConfigRecord({"site": setup.split.name})
        else:
            content["latents"] = to_record(tuner.forward(epoch, step))
            save_finetuner(tuner, path, run_cfg, setup)
        return Message(content, reply_to=msg)

    @app.train("finetune_backward")
    def finetune_backward(msg: Message, context: Context) -> Message:
        run_cfg, setup = resolve(context)
        request = msg.content.config_records["request"]
        epoch, epochs, step = (int(request[k]) for k in ("epoch", "epochs", "step"))
        tuner, path = finetuner(run_cfg, setup, context, start=False)
        mapped = arrays_of(msg.content.array_records["mapped"])
        grad, loss = tuner.decode_and_backward(epoch, step, epochs, mapped)
        content = RecordDict({"grad": to_record(grad), "metrics": MetricRecord({"loss": loss})})
        # training.finetune_pipeline: the previous batch's encoder step, then the next batch.
        if "grad" in msg.content.array_records:
            owed = arrays_of(msg.content.array_records["grad"])
            tuner.backward_encoder(
                int(request["grad_epoch"]), int(request["grad_step"]), epochs, owed
            )
        if "next_step" in request:
            content["latents"] = to_record(tuner.forward(epoch, int(request["next_step"])))
        save_finetuner(tuner, path, run_cfg, setup)
        return Message(content, reply_to=msg)

    @app.evaluate("segment")
    def segment(msg: Message, context: Context) -> Message:
        run_cfg, setup = resolve(context)
        started = time.perf_counter()
        models = load_models(run_cfg, setup)
        transform = site_transform(run_cfg, setup.key_file)
        mapped = arrays_of(msg.content.array_records["mapped"])
        pred = segment_mapped(run_cfg, models, transform, mapped, setup.split.test.images)
        test = setup.split.test
        metrics = evaluate_predictions(test, pred)
        pick = pick_examples(test, run_cfg.overlays_per_site)
        # Overlays show patient images: they are written locally, never sent.
        write_overlays(
            setup.out_dir,
            setup.split.name,
            Examples(test.images[pick, 0], test.masks[pick], pred[pick]),
            test.class_names,
            method=method_name(run_cfg),
        )
        metrics["decode_seconds"] = time.perf_counter() - started
        reply = ConfigRecord({"metrics_json": json.dumps(metrics)})
        return Message(RecordDict({"result": reply}), reply_to=msg)

    return app


app = make_client_app()


def finetune_state_path(setup: SiteSetup) -> Path:
    return site_models_path(setup.out_dir, setup.split.name).with_name("finetune-state.pt")


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})
