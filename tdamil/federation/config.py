"""Configuration of the federated optimisation, shared by the coordinator and the simulation."""

from __future__ import annotations

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
    min_replies:       the round's update is applied when at least this many sites replied in time
                       (default: min_sites); with fewer the round is logged as failed and the
                       global model is kept. Lower it to let a round finish when a site dies mid-round.
    fraction_sites:    fraction of the connected sites sampled per round (at least min_sites).
    round_timeout_s:   how long a round waits for replies; sites that have not answered by then are
                       logged as failed for this round (a round never waits forever).
    wait_for_sites_s:  how long to wait for min_sites sites to connect before the run stops with an
                       error (it can be resumed).
    strategy:          fedavg | fedprox (proximal term ``proximal_mu`` at the sites) | fedadam |
                       fedyogi (server optimiser with ``server_lr``, ``server_beta_1/2``, ``server_tau``).
    evaluate_sites:    also ask the sites to evaluate the global model on their validation split.
    evaluate_with_train: (with evaluate_sites) one message per site per round: the site evaluates
                       the incoming global model before it trains, and the coordinator records it as
                       the site evaluation of the previous round's model; only the last round's
                       model gets a separate evaluate message. false: a train and an evaluate
                       message every round (the older, slower path, kept for comparison).
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
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 1e-2
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    evaluate_sites: bool = True
    evaluate_with_train: bool = True
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
        if not 0 < self.reply_poll_s <= 10:
            raise ValueError("federation.reply_poll_s must be in (0, 10] seconds")
        if self.round_timeout_s <= 0 or self.wait_for_sites_s <= 0:
            raise ValueError("federation.round_timeout_s and wait_for_sites_s must be > 0")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("federation.proximal_mu must be > 0 with strategy fedprox")


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
