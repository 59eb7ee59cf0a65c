"""Configuration of the federated optimisation, shared by the coordinator and the simulation."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class FederationConfig:
    """The ``federation:`` section of ``configs/server.yaml`` and ``configs/sim_*.yaml``.

    rounds:            total number of federated rounds (``--resume`` continues up to this number).
    local_epochs:      epochs each site trains per round.
    lr:                the sites' AdamW learning rate; weight_decay its weight decay.
    min_sites:         a round starts when at least this many sites are connected (and samples at
                       least this many).
    min_replies:       partial aggregation: when the round's deadline passes, the replies that
                       arrived are aggregated if at least this many sites sent a sound one (default:
                       min_sites, i.e. every sampled site must answer); with fewer the round is
                       logged as failed and the global model is kept. Set it below the number of
                       sites, e.g. "all but one" (min_sites - 1), so that one site's lost link or
                       stalled upload costs only that site's update, not the round.
    fraction_sites:    fraction of the connected sites sampled per round (at least min_sites).
    round_timeout_s:   the deadline of the whole round, counted from its train message: the site
                       evaluation message of the same round (where one is sent) gets only what is
                       left of it. When it passes, the round aggregates the replies that arrived
                       (``min_replies`` permitting) and audits every site without a reply by name
                       ("no reply by the round's deadline"); a reply that arrives later is refused
                       and audited, never aggregated into a later round. Size it to the slowest
                       site's local training plus its transfers (upload and download of the model
                       at its link's rate), with a margin.
    wait_for_sites_s:  how long to wait for min_sites sites to connect before the run stops with an
                       error (it can be resumed).
    strategy:          fedavg | fedprox (proximal term ``proximal_mu`` at the sites) | fedadam |
                       fedyogi (server optimiser with ``server_lr``, ``server_beta_1/2``, ``server_tau``)
                       | a robust rule, for consortia that must tolerate a faulty or hostile site
                       (each ignores ``num-examples``: every site counts the same):
                       fedmedian (coordinate-wise median; tolerates fewer than half the replies
                       being bad; needs >= 3 sites to outvote one), fedtrimmedavg (drops the
                       ``trim_beta`` fraction of highest and lowest values per coordinate, then
                       averages; with 5 sites and beta 0.2 one bad site is trimmed), krum (the one
                       update closest to its n - f - 2 neighbours; needs n >= 2f + 3 replies),
                       multikrum (averages the ``krum_select`` best by Krum's score; same
                       requirement), bulyan (Krum selection, then a trimmed median; needs n >= 4f + 3
                       replies). f = ``faulty_sites``. Krum and Bulyan are checked against
                       ``min_replies`` so that a round that may aggregate meets their requirement.
    faulty_sites:      f, the number of faulty or hostile sites krum / multikrum / bulyan tolerate.
    trim_beta:         fedtrimmedavg: fraction cut at each end per coordinate (0 <= beta < 0.5).
    krum_select:       multikrum: how many updates to average (default: min_replies - faulty_sites).
    max_site_examples: a train reply's ``num-examples`` (the site's training slides, its FedAvg
                       weight) must be an integer in [1, max_site_examples]; set it to the largest
                       site's slide count (with a margin) so no site can claim to outweigh the others.
    update_norm_factor: drop an update whose norm ``||w_site - w_global||`` exceeds this factor times
                       the median norm of the other sites' updates in that round (null: off). See
                       :mod:`tdamil.federation.screening`.
    update_min_cosine: with >= 3 updates, drop one whose cosine with the mean of the others is below
                       this value and that is opposed to most of them one by one (a sign-flipped
                       update; null: off).
    evaluate_sites:    also ask the sites to evaluate the global model on their validation split.
    evaluate_with_train: (with evaluate_sites) one message per site per round: the site evaluates
                       the incoming global model before it trains, and the coordinator records it as
                       the site evaluation of the previous round's model; only the last round's
                       model gets a separate evaluate message, which carries only the bit-exact
                       difference to the model each site kept from that round (docs/WIRE.md). false: a train and an evaluate
                       message every round (the older, slower path, kept for comparison).
    update_codec:      how a site sends its trained model (:mod:`tdamil.federation.wire`; every
                       message's model travels as one packed array, the global model always in
                       fp32): ``fp32`` (bit-exact, the default), ``fp16`` (the weights in half
                       precision) or ``fp16-delta`` (trained minus global in half precision, added
                       back to the global model by the coordinator). Both fp16 codecs halve the
                       bytes of a reply; measured in ``benchmarks/wan.md``.
    reply_poll_s:      how often the coordinator pulls the sites' replies (Flower's own grid waits
                       3 s between pulls: 1.5 s lost per message on average).
    seed:              seed of the initial global model.
    """

    rounds: int = 10
    local_epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    min_sites: int = 2
    min_replies: Optional[int] = None
    fraction_sites: float = 1.0
    round_timeout_s: float = 3600.0
    wait_for_sites_s: float = 600.0
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
                      "multikrum", "bulyan"] = "fedavg"
    faulty_sites: int = 1
    trim_beta: float = 0.2
    krum_select: Optional[int] = None
    max_site_examples: int = 100_000
    update_norm_factor: Optional[float] = 10.0
    update_min_cosine: Optional[float] = 0.0
    proximal_mu: float = 0.01
    server_lr: float = 1e-2
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    evaluate_sites: bool = True
    evaluate_with_train: bool = True
    update_codec: Literal["fp32", "fp16", "fp16-delta"] = "fp32"
    reply_poll_s: float = 0.1
    seed: int = 0

    @property
    def required_replies(self) -> int:
        return self.min_replies if self.min_replies is not None else self.min_sites

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("federation.rounds must be >= 1")
        if self.local_epochs < 1:
            raise ValueError("federation.local_epochs must be >= 1")
        if self.lr <= 0:
            raise ValueError("federation.lr must be > 0")
        if self.min_sites < 1:
            raise ValueError("federation.min_sites must be >= 1")
        if self.min_replies is not None and not 1 <= self.min_replies <= self.min_sites:
            raise ValueError("federation.min_replies must be between 1 and min_sites")
        if not 0 < self.fraction_sites <= 1:
            raise ValueError("federation.fraction_sites must be in (0, 1]")
        codecs = ("fp32", "fp16", "fp16-delta")
        if self.update_codec not in codecs:
            close = difflib.get_close_matches(str(self.update_codec), codecs, n=1)
            raise ValueError(f"federation.update_codec must be one of {', '.join(codecs)}, got {self.update_codec!r}."
                             + (f" Did you mean {close[0]!r}?" if close else ""))
        if not 0 < self.reply_poll_s <= 10:
            raise ValueError("federation.reply_poll_s must be in (0, 10] seconds")
        if self.round_timeout_s <= 0 or self.wait_for_sites_s <= 0:
            raise ValueError("federation.round_timeout_s and wait_for_sites_s must be > 0")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("federation.proximal_mu must be > 0 with strategy fedprox")
        if self.max_site_examples < 1:
            raise ValueError("federation.max_site_examples must be >= 1")
        if self.update_norm_factor is not None and self.update_norm_factor <= 1:
            raise ValueError("federation.update_norm_factor must be > 1 (or null to turn the check off)")
        if self.update_min_cosine is not None and not -1 <= self.update_min_cosine <= 0:
            raise ValueError("federation.update_min_cosine must be in [-1, 0] (or null to turn the check off)")
        if not 0 <= self.trim_beta < 0.5:
            raise ValueError("federation.trim_beta must be in [0, 0.5)")
        if self.faulty_sites < 0:
            raise ValueError("federation.faulty_sites must be >= 0")
        need = {"krum": 2 * self.faulty_sites + 3, "multikrum": 2 * self.faulty_sites + 3,
                "bulyan": 4 * self.faulty_sites + 3}.get(self.strategy)
        if need is not None and self.required_replies < need:
            raise ValueError(f"federation.strategy {self.strategy} with faulty_sites={self.faulty_sites} needs at "
                             f"least {need} replies per round: raise min_replies/min_sites to {need} or lower "
                             "faulty_sites")
        if self.krum_select is not None and not 1 <= self.krum_select <= self.required_replies:
            raise ValueError("federation.krum_select must be between 1 and min_replies")


@dataclass
class CheckpointConfig:
    """The ``checkpoint:`` section.

    keep_last:  how many per-round checkpoints to keep besides ``last.pt`` and ``best.pt``.
    metric:     metric that picks ``best.pt`` (e.g. auroc, balanced_accuracy, loss).
    mode:       max or min (use min for loss).
    source:     ``heldout`` (server-side evaluation on held-out cohorts, mean over cohorts) or
                ``sites`` (the sites' weighted validation metric); default: heldout when the server
                has held-out data, else sites.
    """

    keep_last: int = 3
    metric: str = "auroc"
    mode: Literal["max", "min"] = "max"
    source: Optional[Literal["heldout", "sites"]] = None
