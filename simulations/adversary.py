"""A malicious simulated hospital (``[[hospitals]] tamper = [...]``): a Flower mod that tampers
with the site's replies after its own guard has passed them, the way a compromised site would.

The attacks come in the order listed, each on a separate split-training reply that carries
latents (after a few honest ones, so the server has a reference for their magnitude), and
``forged-metrics`` on the evaluation reply. The server must refuse each, record why, and go on.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedseg import protocol
from fedseg.config import RunConfig
from fedseg.data.hospitals import expand_hospitals

HONEST_FIRST = 5  # replies with latents before the first attack, then one attack every 3
HUGE_BYTES = 2**30


def tamper_mod(cfg: RunConfig):
    """The mod for ``cfg``'s hospitals; it leaves every site without ``tamper`` alone."""
    plans = {h.index: list(h.profile.tamper) for h in expand_hospitals(cfg)}

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        plan = plans.get(int(context.node_config.get("partition-id", -1)), [])
        if not plan or not reply.has_content():
            return reply
        if "forged-metrics" in plan and msg.metadata.message_type == protocol.SEGMENT:
            _forge_metrics(reply)
            return reply
        if protocol.LATENTS not in reply.content.array_records:
            return reply
        seen = int(context.state.config_records.get("tamper", {}).get("seen", 0))
        context.state.config_records["tamper"] = ConfigRecord({"seen": seen + 1})
        attacks = [a for a in plan if a != "forged-metrics"]
        k, offset = divmod(seen - HONEST_FIRST, 3)
        if seen >= HONEST_FIRST and offset == 0 and k < len(attacks):
            _ATTACKS[attacks[k]](reply)
        return reply

    return mod


def _missing_record(reply: Message) -> None:
    del reply.content[protocol.LATENTS]


def _extra_items(reply: Message) -> None:
    record = reply.content.array_records[protocol.LATENTS]
    reply.content[protocol.LATENTS] = ArrayRecord(
        {k: Array(np.concatenate([v.numpy()] * 10)) for k, v in record.items()}
    )


def _scaled(reply: Message) -> None:
    record = reply.content.array_records[protocol.LATENTS]
    reply.content[protocol.LATENTS] = ArrayRecord(
        {k: Array(v.numpy() * np.float16(100)) for k, v in record.items()}
    )


def _huge(reply: Message) -> None:
    record = reply.content.array_records[protocol.LATENTS]
    arrays = {k: Array(v.numpy()) for k, v in record.items()}
    arrays["padding"] = Array(np.zeros(HUGE_BYTES, dtype=np.uint8))
    reply.content[protocol.LATENTS] = ArrayRecord(arrays)


def _forge_metrics(reply: Message) -> None:
    result = reply.content.config_records[protocol.RESULT]
    metrics = json.loads(str(result["metrics_json"]))
    metrics["dice_mean"] = 1.7
    metrics["n_test"] = 10 * int(metrics.get("n_test", 1))
    reply.content[protocol.RESULT] = ConfigRecord({"metrics_json": json.dumps(metrics)})


_ATTACKS = {
    "missing-record": _missing_record,
    "extra-items": _extra_items,
    "scaled": _scaled,
    "huge": _huge,
}
