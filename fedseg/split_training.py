"""Split training's exchanges, written once for both sides and for every way of running them.

The server's side is :class:`SplitTraining`: the epochs and steps, the encoder gradient each
site is owed, and the shared model between epochs (``training.finetune_share``). A site's side
is :func:`answer_forward` and :func:`answer_backward` on its :class:`SiteFinetuner`. Between
them sits a :class:`SiteLink`: Flower messages in a run (``strategies/finetune.py``), or direct
calls to in-memory fine-tuners (``simulations/in_process.py``: studies, benchmarks, tests), so
what a test or a study measures is the code a federation runs. fedseg/finetune.py has the
maths; docs/privacy.md what each side sees.

Each step is two exchanges with every site that has a batch left in the epoch: forward (the
site applies the encoder gradient it is owed and sends keyed image latents) and backward (it
decodes the mapped latents and sends the loss gradient). With ``training.finetune_pipeline``
(the default) the backward exchange also carries the owed gradient and brings back the next
batch's latents, so a step after an epoch's first is one exchange.
After every epoch the sites' encoders and decoders become one model: ``blind`` (the default)
collects them as masked uint64 vectors and sends back their sum modulo 2^64, which the server
cannot read; ``average`` (SplitFed, the reference) collects the weights themselves.

A site that fails a step or sends a bad payload drops out and the others go on; a reply the
server refuses for one step (malformed or extreme latents or gradients) only skips that step.
A site that fails a blind aggregation round is absent from that sum only: it keeps its own
weights and joins the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedseg.config import RunConfig
from fedseg.privacy.blind import add_blinded, mask_label
from fedseg.protocol import FINAL_STEP, SHARE_STEP, FinetuneRequest

if TYPE_CHECKING:  # the call types below travel through a deployed node's one-message
    # ClientApp process, which needs no torch for them (clients/app.py)
    from fedseg.finetune import SiteFinetuner

log = logging.getLogger("fedseg.server")
Arrays = dict[str, np.ndarray]


@dataclass
class ForwardCall:
    """What the server sends with a forward request."""

    request: FinetuneRequest
    grad: Arrays | None = None  # the encoder gradient the site is owed
    weights: Any = None  # average: the shared model (the link's own form of it)
    blinded_sum: np.ndarray | None = None  # blind: the masked sum of the last round


@dataclass
class ForwardReply:
    """A forward request's answer (one payload is set). ``problems``: what the link could not
    decode, by field, so that the server refuses it with the reason."""

    latents: Arrays | None = None  # the requested batch's keyed image latents
    blinded: np.ndarray | None = None  # SHARE_STEP, blind: the masked shared weights
    weights: Any = None  # SHARE_STEP, average: the shared weights (the link's own form)
    done: bool = False  # FINAL_STEP: the fine-tuned models are the site's models now
    problems: dict[str, str] = field(default_factory=dict)


@dataclass
class BackwardCall:
    request: FinetuneRequest
    mapped: Arrays  # keyed mask latents of the batch
    owed: Arrays | None = None  # pipelined: the last batch's encoder gradient


@dataclass
class BackwardReply:
    grad: Arrays | None  # d loss / d keyed mask latents
    loss: float
    latents: Arrays | None = None  # pipelined: the next batch's keyed image latents
    problems: dict[str, str] = field(default_factory=dict)


Replies = tuple[dict[str, Any], dict[str, str]]  # (reply by site, failure reason by site)


class SiteLink(Protocol):
    """How the server reaches the sites. Sites are named as they registered."""

    def forward(self, calls: dict[str, ForwardCall], timeout_s: float | None) -> Replies: ...

    def backward(self, calls: dict[str, BackwardCall], timeout_s: float | None) -> Replies: ...

    def average(self, weights: dict[str, Any], counts: dict[str, int]) -> Any:
        """The shared weights' mean, weighted by training images (``average``)."""
        ...

    def nbytes(self, weights: Any) -> int: ...

    def drop(self, site: str, reason: str) -> None:
        """The site takes no further part in the phase."""
        ...

    def reject(self, site: str, reason: str, epoch: int, step: int) -> None:
        """One reply refused; the site takes part in the next step."""
        ...


def answer_forward(
    tuner: SiteFinetuner, site: str, call: ForwardCall, run_id: int | str
) -> ForwardReply:
    """A site's forward step: apply what the server sent (the gradient owed, the shared
    model), then answer with a batch's latents, its shared weights (``SHARE_STEP``) or the end.
    Weights and the masked sum are taken as torch state dicts and numpy vectors."""
    request = call.request
    if call.grad is not None:
        tuner.backward_encoder(
            _field(request.grad_epoch), _field(request.grad_step), request.epochs, call.grad
        )
    if call.weights is not None:  # the shared model (average)
        check_finetune_share(tuner.cfg, site)
        tuner.adopt(call.weights)
    if call.blinded_sum is not None:  # the masked sum of the sites' weights
        label = mask_label(run_id, _field(request.blind_epoch))
        tuner.adopt_blinded(call.blinded_sum, label, request.blind_sites)
    if request.step == FINAL_STEP:
        return ForwardReply(done=True)
    if request.step != SHARE_STEP:
        return ForwardReply(latents=tuner.forward(request.epoch, request.step))
    check_finetune_share(tuner.cfg, site)
    if tuner.cfg.training.finetune_share != "blind":
        return ForwardReply(weights=tuner.shared_state())
    if request.share_epoch is None:
        raise PermissionError(
            f"site {site}: training.finetune_share is 'blind': its weights "
            "leave only masked, and the server asked for them in the clear"
        )
    return ForwardReply(blinded=tuner.blinded_state(mask_label(run_id, request.share_epoch)))


def answer_backward(tuner: SiteFinetuner, call: BackwardCall) -> BackwardReply:
    """A site's backward step: decode the mapped latents against the batch's masks; pipelined,
    also take the owed encoder step and encode the next batch."""
    request = call.request
    grad, loss = tuner.decode_and_backward(request.epoch, request.step, request.epochs, call.mapped)
    if call.owed is not None:
        tuner.backward_encoder(
            _field(request.grad_epoch), _field(request.grad_step), request.epochs, call.owed
        )
    latents = None
    if request.next_step is not None:
        latents = tuner.forward(request.epoch, request.next_step)
    return BackwardReply(grad, loss, latents)


def check_finetune_share(cfg: RunConfig, site: str) -> None:
    """Fine-tuning weights are shared only if the site's own config says so."""
    if cfg.training.finetune_share == "none":
        raise PermissionError(
            f"site {site}: refusing to exchange encoder/decoder weights: this site's "
            "training.finetune_share is 'none'"
        )


def _field(value: int | None) -> int:
    if value is None:
        raise ValueError("a gradient or sum came without the step it belongs to")
    return value


class SplitTraining:
    """The server's side of the phase over any :class:`SiteLink`. ``sites``: training images
    by site name, in the order the sites registered."""

    def __init__(
        self,
        coordinator,
        link: SiteLink,
        sites: dict[str, int],
        timeout_s: float | None = None,
        share_timeout_s: float | None = None,
    ) -> None:
        self.coordinator, self.link = coordinator, link
        self.cfg = coordinator.cfg
        self.sites = dict(sites)
        self.timeout_s = timeout_s
        self.share_timeout_s = share_timeout_s or timeout_s
        self.share = self.cfg.training.finetune_share
        from fedseg.finetune import finetune_steps, split_epochs

        self.epochs = split_epochs(self.cfg.training, sites.values())
        self.steps = {n: finetune_steps(k, self.cfg.training.batch_size) for n, k in sites.items()}
        self.owed: dict[str, tuple[int, int, Arrays]] = {}  # encoder gradients not yet sent
        self.adopt: dict[str, Any] = {}  # average: the mean each site takes with its next call
        # blind: the masked sum each site unmasks with its next call, with its epoch and the
        # names of the sites added into it.
        self.adopt_blind: dict[str, tuple[np.ndarray, int, list[str]]] = {}
        self.share_bytes: list[int] = []  # bytes in + out of each epoch's aggregation
        self.share_seconds: list[float] = []  # its wall-clock (the sites' work included)
        self.absent: list[list[str]] = []  # blind: sites missing from each aggregation round

    def run(self, on_epoch: Callable[[int, int, float], None] | None = None) -> list[float]:
        """Mean training loss of each epoch; ``on_epoch(done, epochs, loss)`` after each."""
        losses: list[float] = []
        for epoch in range(self.epochs):
            if not self.sites:
                break
            epoch_losses: list[float] = []
            ahead: dict[str, ForwardReply | BackwardReply] = {}  # latents sent in advance
            for step in range(max(self.steps[n] for n in self.sites)):
                active = [n for n in self.sites if step < self.steps[n]]
                epoch_losses += self._step(active, epoch, step, ahead)
            started = time.perf_counter()
            if self.share == "average":
                self._collect_average()
            elif self.share == "blind":
                self._collect_blind(epoch)
            if self.share in ("average", "blind"):
                self.share_seconds.append(time.perf_counter() - started)
            losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
            log.info("split training epoch %d/%d: Dice+CE %.4f", epoch + 1, self.epochs, losses[-1])
            if on_epoch is not None:
                on_epoch(epoch + 1, self.epochs, losses[-1])
        final = [
            n for n in self.sites if n in self.owed or n in self.adopt or n in self.adopt_blind
        ]
        self._forward(final, FINAL_STEP, FINAL_STEP)
        return losses

    def _drop(self, site: str, reason: str) -> None:
        if self.sites.pop(site, None) is not None:
            self.link.drop(site, reason)

    def _call(self, site: str, epoch: int, step: int, share_epoch: int | None) -> ForwardCall:
        request = FinetuneRequest(epoch, self.epochs, step, start=epoch == 0 == step)
        request.share_epoch = share_epoch
        call = ForwardCall(request)
        if site in self.adopt_blind:
            call.blinded_sum, request.blind_epoch, request.blind_sites = self.adopt_blind.pop(site)
        call.weights = self.adopt.pop(site, None)
        if site in self.owed:
            request.grad_epoch, request.grad_step, call.grad = self.owed.pop(site)
        return call

    def _forward(
        self, sites: list[str], epoch: int, step: int, share_epoch: int | None = None
    ) -> dict[str, ForwardReply]:
        """Each site's owed gradient applied; the step's latents (or weights) asked for. A site
        that fails is dropped, except from a blind round (``share_epoch``: only absent)."""
        if not sites:
            return {}
        calls = {n: self._call(n, epoch, step, share_epoch) for n in sites}
        timeout = self.share_timeout_s if share_epoch is not None else self.timeout_s
        replies, failed = self.link.forward(calls, timeout)
        if share_epoch is None:
            for site, reason in failed.items():
                self._drop(site, reason)
        else:
            absent = sorted(failed)
            for site, reason in failed.items():
                log.warning("%s absent from aggregation round %d: %s", site, epoch + 1, reason)
            self.absent.append(absent)
        return replies

    def _step(self, active: list[str], epoch: int, step: int, ahead: dict) -> list[float]:
        """One batch at every active site. ``ahead`` holds the replies that brought a site's
        latents with its last gradient (pipelined); the others are asked for theirs first."""
        asked = [n for n in active if n not in ahead]
        ahead.update(self._forward(asked, epoch, step))
        mapped = self._map([n for n in active if n in self.sites], epoch, step, ahead)
        calls = {n: self._backward_call(n, epoch, step, m) for n, m in mapped.items()}
        replies, failed = self.link.backward(calls, self.timeout_s)
        for site, reason in failed.items():
            self._drop(site, reason)
        if self.cfg.training.finetune_pipeline:
            ahead.update({n: r for n, r in replies.items() if step + 1 < self.steps[n]})
        return self._step_server(replies, epoch, step)

    def _map(self, active: list[str], epoch: int, step: int, ahead: dict) -> dict[str, Arrays]:
        """The server's forward pass of the sites' batches, one pass for all of them; a
        refused batch is skipped (the site goes on with the next step). Sites in name order,
        not reply order: the server's first batch fixes the UMN's input bases, and the order of
        the joint batch should not depend on who answered first."""
        batches = {}
        for site in sorted(active):
            reply = ahead.pop(site, None)
            if reply is None or reply.latents is None:
                problem = reply.problems.get("latents") if reply else None
                self.link.reject(
                    site, f"latents: {problem or 'no latents in the reply'}", epoch + 1, step + 1
                )
            else:
                batches[site] = reply.latents
        mapped, refused = self.coordinator.finetune_map(batches)
        for site, reason in refused.items():
            self.link.reject(site, f"latents: {reason}", epoch + 1, step + 1)
        return mapped

    def _backward_call(self, site: str, epoch: int, step: int, mapped: Arrays) -> BackwardCall:
        request = FinetuneRequest(epoch, self.epochs, step)
        call = BackwardCall(request, mapped)
        if self.cfg.training.finetune_pipeline:
            if site in self.owed:
                request.grad_epoch, request.grad_step, call.owed = self.owed.pop(site)
            if step + 1 < self.steps[site]:
                request.next_step = step + 1
        return call

    def _step_server(self, replies: dict[str, BackwardReply], epoch: int, step: int) -> list[float]:
        """The UMN's backward pass and step on the sites' gradients; each site is owed the
        gradient for its image latents. Returns the sites' losses, in site-name order (their
        float mean, and the order in which the UMN sums the gradients, must not depend on who
        answered first)."""
        grads, losses = {}, []
        for site in sorted(replies):
            reply = replies[site]
            try:
                if reply.grad is None:
                    raise ValueError(reply.problems.get("grad") or "no gradient in the reply")
                if "loss" in reply.problems:
                    raise ValueError(reply.problems["loss"])
                if not np.isfinite(reply.loss) or reply.loss < 0:
                    raise ValueError(f"loss {reply.loss} is not a loss")
            except ValueError as err:
                self.link.reject(site, f"gradient: {err}", epoch + 1, step + 1)
                continue
            grads[site] = reply.grad
            losses.append(reply.loss)
        answers, refused = self.coordinator.finetune_backward(grads, epoch, self.epochs)
        for site, reason in refused.items():
            self.link.reject(site, f"gradient: {reason}", epoch + 1, step + 1)
        for site, grad in answers.items():
            self.owed[site] = (epoch, step, grad)
        return losses

    def _collect_average(self) -> None:
        """The sites' shared weights (after the gradient each is owed), averaged by the link
        weighted by training images; each site takes the mean with its next call."""
        replies = self._forward(list(self.sites), SHARE_STEP, SHARE_STEP)
        weights = {}
        for site in sorted(replies):  # name order: the weighted mean's float sum depends on it
            if replies[site].weights is None:
                self._drop(site, "share reply without weights")
            else:
                weights[site] = replies[site].weights
        if not weights:
            self.adopt = {}
            return
        mean = self.link.average(weights, {n: self.sites[n] for n in weights})
        self.adopt = dict.fromkeys(self.sites, mean)
        received = sum(self.link.nbytes(w) for w in weights.values())
        self.share_bytes.append(received + len(self.sites) * self.link.nbytes(mean))

    def _collect_blind(self, epoch: int) -> None:
        """Every site's masked weights, added modulo 2^64; each site gets the masked sum and
        the names of the sites in it with its next request. A site whose reply is not one uint64
        vector of the common length is dropped, never added (it would corrupt the sum)."""
        replies = self._forward(list(self.sites), SHARE_STEP, SHARE_STEP, share_epoch=epoch)
        vectors: dict[str, np.ndarray] = {}
        for site, reply in replies.items():
            vector = reply.blinded
            if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.ndim != 1:
                self._drop(
                    site, reply.problems.get("blinded", "share reply without a blinded vector")
                )
            else:
                vectors[site] = vector
        lengths = [len(v) for v in vectors.values()]
        common = max(set(lengths), key=lengths.count) if lengths else 0
        for site in [n for n, v in vectors.items() if len(v) != common]:
            self._drop(site, f"blinded vector of {len(vectors.pop(site))} values, not {common}")
        if not vectors:
            return
        total = add_blinded(vectors.values())
        names = sorted(vectors)
        self.adopt_blind = {n: (total, epoch, names) for n in vectors}
        received = sum(v.nbytes for v in vectors.values())
        self.share_bytes.append(received + len(vectors) * total.nbytes)
