"""The messages between the server and a hospital, defined once: their types, the keys of the
records they carry, and typed requests.

Both sides use these names (``clients/`` reads what ``strategies/`` writes), so a renamed field
is one edit, and a request a hospital cannot read is refused by name before any work. The
library knows nothing of Flower: a request is a dataclass that becomes a plain dict, which the
thin Flower layers put in a ``ConfigRecord`` (``to_config``) and read back (``from_config``).

Flow of one run (the server's phases send them in this order):

- ``REGISTER``: the site reports sizes, class names and aggregate statistics (paper preset:
  after training its autoencoders), in the ``METRICS`` and ``SITE`` records; with
  ``privacy.query = "ckks"`` also its CKKS public bundle (``CKKS_KEYS``), once a run.
- ``LATENTS``: keyed fp16 latents of a chunk of the training stream or the test split
  (``LatentRequest``), in the ``LATENTS`` record.
- ``ROUND``: one UMN round's participation (``RoundRequest``): fresh training latents, or a
  heartbeat.
- ``FINETUNE_FORWARD`` / ``FINETUNE_BACKWARD``: split training (``FinetuneRequest``); the
  server sends ``GRAD`` (encoder gradient owed), ``MAPPED`` (keyed mask latents), ``WEIGHTS``
  or ``BLINDED`` (the shared model, plain or as a masked sum); the site answers ``LATENTS``,
  ``GRAD`` (the decoder's), ``BLINDED`` or ``WEIGHTS`` (its shared model), ``METRICS`` (loss).
- ``SEGMENT``: the site decodes ``MAPPED`` test latents and answers ``RESULT`` (metrics JSON).
  With ``privacy.query = "ckks"`` a ``SegmentRequest`` in ``REQUEST`` names the step: ``query``
  (the ciphertexts of test images [start, stop), ``CKKS_QUERY``), ``decode`` (``MAPPED`` holds
  the server's mapped ciphertexts; the site decrypts, decodes and answers ``RESULT``).
- ``mode = "inr"`` (implicit neural obfuscation) instead of the latent phases:
  ``INR_RELEASE`` asks for one chunk of a site's training images (``LatentRequest`` with split
  "train" and the chunk's bounds); the site answers ``RELEASE`` (``images``: re-rendered from
  mixed codes, fp16; ``masks``: uint8) and ``METRICS`` (the fit's figures). ``INR_EVALUATE``
  carries the server's network in ``WEIGHTS``; the site answers ``RESULT`` (metrics JSON).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Message types ("<category>.<action>", as Flower routes them to the ClientApp's handlers).
REGISTER = "train.autoencoders"
LATENTS_QUERY = "query.latents"
ROUND = "query.round"
FINETUNE_FORWARD = "train.finetune_forward"
FINETUNE_BACKWARD = "train.finetune_backward"
SEGMENT = "evaluate.segment"
INR_RELEASE = "query.inr_release"
INR_EVALUATE = "evaluate.network"

# Record keys.
REQUEST = "request"  # the typed request below
CONFIG = "config"  # REGISTER's options (``reuse``)
SITE = "site"  # REGISTER's reply: name, class names, statistics
METRICS = "metrics"  # numbers a site reports (sizes, losses)
RESULT = "result"  # SEGMENT's reply: ``metrics_json``
HEARTBEAT = "heartbeat"  # ROUND's reply without latents
DONE = "done"  # the last FINETUNE_FORWARD's reply
LATENTS = "latents"  # keyed image latents (fp16), the site's main payload
GRAD = "grad"  # a gradient (either way)
MAPPED = "mapped"  # keyed mask latents from the server
WEIGHTS = "weights"  # the shared encoder/decoder in the clear (finetune_share = "average")
BLINDED = "blinded"  # the shared encoder/decoder as a masked uint64 vector, or the masked sum
CKKS_KEYS = (
    "ckks_keys"  # REGISTER: a hospital's CKKS public bundle (no secret key: privacy/ckks.py)
)
CKKS_QUERY = "ckks_query"  # CKKS ciphertexts of keyed test latents
RELEASE = "release"  # inr: a chunk's re-rendered images and its masks

# SegmentRequest steps (privacy.query = "ckks")
SEGMENT_QUERY = "query"
SEGMENT_DECODE = "decode"

# Split-training steps beyond a batch index: the site applies the gradient it is owed, then
FINAL_STEP = -1  # saves its fine-tuned models (the end of the phase)
SHARE_STEP = -2  # sends its shared weights (training.finetune_share)


class ProtocolError(ValueError):
    """A request or reply lacks a field or has one of the wrong type."""


R = TypeVar("R", bound="Request")


@dataclass
class Request:
    """A request's fields; ``None`` fields and empty lists are left out of the record."""

    def to_config(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != []}

    @classmethod
    def from_config(cls: type[R], values: Mapping[str, Any]) -> R:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{cls.__name__}: no {f.name!r}")
                continue
            kwargs[f.name] = _typed(cls.__name__, f.name, values[f.name], str(f.type))
        return cls(**kwargs)


def _typed(where: str, name: str, value: Any, hint: str) -> Any:
    """``value`` as the field's type (Flower's records keep ints, floats, bools, strs, lists)."""
    base = hint.replace(" | None", "")
    try:
        if base == "bool":
            return bool(value)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if base == "float":
            return float(value)
        if base == "str":
            return str(value)
        if base == "list[str]":
            return [str(v) for v in value]
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"{where}.{name} = {value!r}: {err}") from None
    raise ProtocolError(f"{where}.{name}: unsupported field type {hint}")


@dataclass
class LatentRequest(Request):
    split: str  # "train" (the augmented training stream) or "test"
    start: int
    stop: int


@dataclass
class RoundRequest(Request):
    round: int  # 1-based UMN round
    start: int  # items of the training stream to send: [start, stop); none = a heartbeat
    stop: int
    deadline_s: float = 0.0  # the server waits this long (a simulated outage stalls past it)


@dataclass
class FinetuneRequest(Request):
    epoch: int
    epochs: int
    step: int  # a batch index, SHARE_STEP or FINAL_STEP
    start: bool = False  # the first message of the phase: start from the trained models
    grad_epoch: int | None = None  # the encoder gradient in GRAD is for this batch
    grad_step: int | None = None
    next_step: int | None = None  # pipelined: also encode and send this batch
    share_epoch: int | None = None  # SHARE_STEP: the aggregation round (blind masks' label)
    blind_epoch: int | None = None  # BLINDED carries the masked sum of this round
    blind_sites: list[str] = field(default_factory=list)  # ... over these sites


@dataclass
class SegmentRequest(Request):
    """An encrypted evaluation's step (``SEGMENT_*``); a plain SEGMENT carries none."""

    step: str
    start: int = 0  # SEGMENT_QUERY: test images [start, stop)
    stop: int = 0
