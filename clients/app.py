"""Flower ClientApp: one hospital. Each handler decodes a message (``fedseg/protocol.py``),
calls ``fedseg/hospital.py`` and encodes the reply.

Every reply passes the site's guard before it leaves: key material is refused
(``fedseg/privacy/audit.py``), and a failure reaches the server as its kind and a short
message without paths (``fedseg/privacy/redact.py``). In a simulation (a node with a
``partition-id``) the hospital's simulated profile (speed, outages) applies through a mod from
``simulations/``; a deployed hospital never imports it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseg import protocol, site_worker
from fedseg.config import RunConfig, config_from_run_config
from fedseg.deploy.runtime import deployed_site, node_out_dir, resolve_scenario
from fedseg.privacy.audit import guard_and_audit, numeric_lists
from fedseg.privacy.redact import SiteError, public_error
from fedseg.protocol import FinetuneRequest, LatentRequest, RoundRequest, SegmentRequest
from fedseg.split_training import BackwardCall, ForwardCall

if TYPE_CHECKING:
    from fedseg.site import SiteSetup

# torch, the models and the site's data load where a handler computes here (``resolve``): a
# deployed node starts this app in a new process for every message, and a split-training step
# only hands its message to the hospital's worker, which holds them all (fedseg/site_worker.py).

log = logging.getLogger("fedseg.client")
APP_DIR = Path(__file__).resolve().parents[1]  # the app as installed on this node


class Hospital:
    """The handlers of one ClientApp. ``cfg`` given: the CLI's scenario; otherwise it is read
    from the Flower run config of each message."""

    def __init__(self, cfg: RunConfig | None = None) -> None:
        self.cfg = cfg

    def config(self, context: Context) -> RunConfig:
        return self.cfg or config_from_run_config(
            resolve_scenario(dict(context.run_config), APP_DIR)
        )

    def resolve(self, context: Context) -> tuple[RunConfig, SiteSetup]:
        """The run's config and this hospital's site, its data loaded (once per process in a
        simulation: fedseg.data caches it)."""
        import torch

        from fedseg.site import resolve_site

        cfg = self.config(context)
        torch.set_num_threads(cfg.training.threads)
        return cfg, resolve_site(cfg, dict(context.node_config))

    def identity(self, context: Context) -> tuple[RunConfig, str, Path | None]:
        """(config, site name, key file) for the guard, from the node config and the scenario,
        without loading the site's data (fedseg.data.simulated_hospital says why)."""
        node = dict(context.node_config)
        deployed = deployed_site(node)
        if deployed is not None:
            return self.config(context), deployed.name, deployed.key_file
        from fedseg.data import simulated_hospital
        from fedseg.privacy.keys import site_key_file

        cfg = self.config(context)
        name, _, _ = simulated_hospital(cfg, int(node["partition-id"]))
        return cfg, name, site_key_file(cfg, node, name)

    def register(self, msg: Message, context: Context) -> Message:
        """In the hospital's worker when split training follows (the worker loads the data and
        torch that it will train with, and this process neither), else here."""
        cfg = self.config(context)
        options = msg.content.config_records.get(protocol.CONFIG, {})
        worker = cfg.mode == "latents" and cfg.training.finetune_epochs != 0
        reuse = bool(options.get("reuse", False))
        metrics, info = self.site_call("register", context, reuse, worker=worker)
        reply = {protocol.METRICS: MetricRecord(metrics), protocol.SITE: ConfigRecord(info)}
        if cfg.privacy.query == "ckks":  # its CKKS public bundle, once, with its registration
            keys = self.site_call("ckks_keys", context, worker=worker)
            reply[protocol.CKKS_KEYS] = to_record(keys)
        return Message(RecordDict(reply), reply_to=msg)

    def latents(self, msg: Message, context: Context) -> Message:
        from fedseg import hospital

        cfg, setup = self.resolve(context)
        request = LatentRequest.from_config(msg.content.config_records[protocol.REQUEST])
        arrays = hospital.latent_chunk(cfg, setup, request)
        return Message(RecordDict({protocol.LATENTS: to_record(arrays)}), reply_to=msg)

    def umn_round(self, msg: Message, context: Context) -> Message:
        from fedseg import hospital

        cfg, setup = self.resolve(context)
        request = RoundRequest.from_config(msg.content.config_records[protocol.REQUEST])
        beat = ConfigRecord({"site": setup.split.name, "round": request.round})
        content = RecordDict({protocol.HEARTBEAT: beat})
        arrays = hospital.round_latents(cfg, setup, request)
        if arrays is not None:
            content[protocol.LATENTS] = to_record(arrays)
        return Message(content, reply_to=msg)

    def finetune_forward(self, msg: Message, context: Context) -> Message:
        records = msg.content.array_records
        weights, blinded = records.get(protocol.WEIGHTS), records.get(protocol.BLINDED)
        call = ForwardCall(
            FinetuneRequest.from_config(msg.content.config_records[protocol.REQUEST]),
            grad=optional_arrays(records, protocol.GRAD),
            weights=weights.to_torch_state_dict() if weights is not None else None,
            blinded_sum=blinded["sum"].numpy() if blinded is not None else None,
        )
        answer = self.site_call("finetune_forward", context, call, msg.metadata.run_id)
        content = RecordDict()
        if answer.latents is not None:
            content[protocol.LATENTS] = to_record(answer.latents)
        if answer.blinded is not None:
            content[protocol.BLINDED] = to_record({"sum": answer.blinded})
        if answer.weights is not None:  # average: once an epoch
            _, setup = self.resolve(context)
            content[protocol.WEIGHTS] = ArrayRecord(answer.weights)
            content[protocol.METRICS] = MetricRecord({"num-examples": len(setup.split.train)})
        if answer.done:
            content[protocol.DONE] = ConfigRecord({"site": self.identity(context)[1]})
        return Message(content, reply_to=msg)

    def finetune_backward(self, msg: Message, context: Context) -> Message:
        records = msg.content.array_records
        call = BackwardCall(
            FinetuneRequest.from_config(msg.content.config_records[protocol.REQUEST]),
            arrays_of(records[protocol.MAPPED]),
            owed=optional_arrays(records, protocol.GRAD),
        )
        answer = self.site_call("finetune_backward", context, call)
        content = RecordDict(
            {
                protocol.GRAD: to_record(answer.grad),
                protocol.METRICS: MetricRecord({"loss": answer.loss}),
            }
        )
        if answer.latents is not None:
            content[protocol.LATENTS] = to_record(answer.latents)
        return Message(content, reply_to=msg)

    def site_call(self, fn: str, context: Context, *args, worker: bool = True):
        """``fedseg.hospital.<fn>``, in the hospital's worker when it has one and ``worker``
        (fedseg/site_worker.py: the state stays in memory, the sites run side by side, and this
        process needs neither torch nor the site's data for it), else in this process."""
        cfg = self.config(context)
        node_config = dict(context.node_config)
        out_dir = node_out_dir(cfg.out_dir, node_config)
        where = site_worker.placement(cfg, node_config, out_dir) if worker else None
        if where is None:
            from fedseg import hospital

            cfg, setup = self.resolve(context)
            return getattr(hospital, fn)(cfg, setup, *args)
        folder, slot, threads = where
        return site_worker.call(folder, slot, fn, cfg, node_config, *args, threads=threads)

    def segment(self, msg: Message, context: Context) -> Message:
        """Plain: decode ``MAPPED`` and score. Encrypted (a ``SegmentRequest``): send the CKKS
        public bundle, the ciphertexts of a chunk of test latents, or decrypt ``MAPPED`` and
        score; a site whose own config does not say ``privacy.query = "ckks"`` refuses."""
        from fedseg import hospital

        cfg, setup = self.resolve(context)
        config = msg.content.config_records
        request = (
            SegmentRequest.from_config(config[protocol.REQUEST])
            if protocol.REQUEST in config
            else None
        )
        if request is not None and cfg.privacy.query != "ckks":
            raise PermissionError("encrypted evaluation asked, but privacy.query is not 'ckks'")
        if request is None or request.step == protocol.SEGMENT_DECODE:
            mapped = arrays_of(msg.content.array_records[protocol.MAPPED])
            metrics = hospital.segment(cfg, setup, mapped, encrypted=request is not None)
            result = ConfigRecord({"metrics_json": json.dumps(metrics)})
            return Message(RecordDict({protocol.RESULT: result}), reply_to=msg)
        if request.step == protocol.SEGMENT_QUERY:
            query = hospital.ckks_query(cfg, setup, request.start, request.stop)
            return Message(RecordDict({protocol.CKKS_QUERY: to_record(query)}), reply_to=msg)
        raise ValueError(f"unknown segment step {request.step!r}")

    def inr_release(self, msg: Message, context: Context) -> Message:
        """``mode = "inr"``: one chunk of training images, re-rendered from mixed codes."""
        from fedseg import obfuscation

        cfg, setup = self.resolve(context)
        request = LatentRequest.from_config(msg.content.config_records[protocol.REQUEST])
        arrays, fit = obfuscation.release_chunk(cfg, setup, request, msg.metadata.run_id)
        content = {protocol.RELEASE: to_record(arrays), protocol.METRICS: MetricRecord(fit)}
        return Message(RecordDict(content), reply_to=msg)

    def inr_evaluate(self, msg: Message, context: Context) -> Message:
        """``mode = "inr"``: score the server's network on this site's own test images."""
        from fedseg import obfuscation

        cfg, setup = self.resolve(context)
        state = msg.content.array_records[protocol.WEIGHTS].to_torch_state_dict()
        metrics = obfuscation.score_network(cfg, setup, state)
        result = ConfigRecord({"metrics_json": json.dumps(metrics)})
        return Message(RecordDict({protocol.RESULT: result}), reply_to=msg)

    def outgoing_guard(self, msg: Message, context: Context, call_next) -> Message:
        """No reply leaves with key material in it (arrays, metrics, config, text)."""
        reply = call_next(msg, context)
        if reply.has_content():
            cfg, site, key_file = self.identity(context)
            arrays, texts = reply_payload(reply)
            guard_and_audit(cfg, site, key_file, msg.metadata.message_type, arrays, texts)
        return reply

    def simulated_profile(self, msg: Message, context: Context, call_next) -> Message:
        """A simulated hospital's profile (speed, outages); a deployed node has none."""
        if "partition-id" not in context.node_config:
            return call_next(msg, context)
        from fedseg.data import simulated_hospital
        from simulations.profiles import apply_profile  # simulation only

        cfg = self.config(context)
        hospital = simulated_hospital(cfg, int(context.node_config["partition-id"]))
        return apply_profile(msg, context, call_next, cfg, *hospital)


def public_errors(msg: Message, context: Context, call_next) -> Message:
    """A failure reaches the server as its kind and a short message without paths
    (fedseg/privacy/redact.py); the full error stays in this site's log."""
    try:
        return call_next(msg, context)
    except Exception as err:
        log.error("%s failed", msg.metadata.message_type, exc_info=True)
        raise SiteError(public_error(err)) from None


def make_client_app(cfg: RunConfig | None = None, mods: tuple = ()) -> ClientApp:
    """``mods`` run outside the site's own (a simulation's adversary: simulations/adversary.py)."""
    site = Hospital(cfg)
    app = ClientApp(mods=[*mods, public_errors, site.outgoing_guard, site.simulated_profile])
    app.train("autoencoders")(site.register)
    app.query("latents")(site.latents)
    app.query("round")(site.umn_round)
    app.train("finetune_forward")(site.finetune_forward)
    app.train("finetune_backward")(site.finetune_backward)
    app.evaluate("segment")(site.segment)
    app.query("inr_release")(site.inr_release)
    app.evaluate("network")(site.inr_evaluate)
    return app


app = make_client_app()


def reply_payload(reply: Message) -> tuple[dict[str, np.ndarray], list[str]]:
    """Everything a reply carries, for the guard: arrays by ``record.key``, records as JSON
    texts, and list-valued record entries as arrays (a key row sent as a list of numbers)."""
    content = reply.content
    arrays = {
        f"{rk}.{ak}": arr.numpy()
        for rk, rec in content.array_records.items()
        for ak, arr in rec.items()
    }
    records = {
        **{f"config.{k}": v for k, v in content.config_records.items()},
        **{f"metrics.{k}": v for k, v in content.metric_records.items()},
    }
    for name, rec in records.items():
        arrays.update(numeric_lists(name, rec))
    return arrays, [json.dumps(dict(rec)) for rec in records.values()]


def optional_arrays(records, key: str) -> dict[str, np.ndarray] | None:
    return arrays_of(records[key]) if key in records else None


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})
