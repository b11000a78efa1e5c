"""The federated run's settings: how each client trains (``ClientConfig``) and the whole run (``FederatedConfig``); no heavy imports, so the CLI checks them at once."""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic.dataclasses import dataclass

from mlplatform.config import RUN_CONFIG


@dataclass(config=RUN_CONFIG)
class ClientConfig:
    """How every client trains locally."""

    local_epochs: int = pydantic.Field(1, ge=1)
    """E: passes over the client's own data per round."""
    batch_size: int = pydantic.Field(16, ge=1)
    """Texts per local batch."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Local optimizer; a fresh one each round (client state does not persist between rounds)."""
    learning_rate: float = pydantic.Field(5.0, gt=0.0)
    """Local learning rate (5.0 suits SGD on the n-gram task's L2-normalised features; AdamW on BERT wants ~1e-3)."""
    weight_decay: float = pydantic.Field(0.0, ge=0.0)
    """Local weight decay."""
    max_grad_norm: float | None = pydantic.Field(None, gt=0.0)
    """Per-batch gradient clipping; None leaves gradients alone."""


@dataclass(config=RUN_CONFIG)
class FederatedConfig(ClientConfig):
    """One federated run; every field can be set from YAML or ``--set key=value`` (client fields included)."""

    task: Literal["ngram", "emotion"] = "ngram"
    """ngram: softmax regression on hashed character n-grams (tiny, fast); emotion: the BERT emotion classifier."""
    corpus: str | None = None
    """JSONL file or folder of labelled texts; None uses the bundled emotion corpus."""
    writers: Literal["all", "private"] = "all"
    """Whose texts the clients hold: all writers, or the private group of the corpus' writer_groups.json, whose
    evaluation then uses the public writers' dev and test splits (a DP run needs private)."""
    public_data_overlap: Literal["refuse", "accept"] = "refuse"
    """dp: refuse a base model or tokenizer whose recorded provenance includes a client's writer; accept runs anyway,
    tagged as giving no guarantee."""
    model: str | None = None
    """emotion task: the model to fine-tune: a folder, a hub name or a registry URI (models:/emotion@champion); None builds the small default BERT."""
    tokenizer: str | None = None
    """emotion task: tokenizer path or hub name; None uses the model's own, or trains the project's WordPiece vocabulary."""
    num_features: int = pydantic.Field(4096, ge=8)
    """ngram task: hash buckets."""
    hidden_size: int = pydantic.Field(128, ge=8)
    """emotion task: width of the default model."""
    num_layers: int = pydantic.Field(2, ge=1)
    """emotion task: layers of the default model."""
    max_length: int = pydantic.Field(128, ge=8)
    """emotion task: tokens per text."""
    train_head_only: bool = False
    """emotion task: federate only the classification head (the encoder stays as loaded); keeps DP noise small."""
    partition: Literal["iid", "dirichlet", "writer"] = "dirichlet"
    """How the training split is dealt to clients; writer gives each writer id its own client."""
    num_clients: int = pydantic.Field(100, ge=1)
    """Virtual clients (iid and dirichlet; writer makes one per writer); under dp also N, the public population size
    of the denominator q·N, which the partition may not exceed."""
    alpha: float = pydantic.Field(0.5, gt=0.0)
    """Dirichlet concentration: small is skewed, large approaches IID."""
    rounds: int = pydantic.Field(50, ge=1)
    """Rounds to run (a DP budget may stop the run sooner)."""
    strategy: Literal["fedavg", "fedprox", "median", "trimmed_mean"] = "fedavg"
    """Aggregation rule (under DP the clipped fixed-denominator mean replaces it)."""
    fraction_fit: float = pydantic.Field(0.1, gt=0.0, le=1.0)
    """Share of clients sampled per round (without DP)."""
    min_fit_clients: int = pydantic.Field(2, ge=1)
    """Fewest updates a round needs before the model moves (without DP)."""
    proximal_mu: float = pydantic.Field(0.01, ge=0.0)
    """FedProx's μ."""
    trim_beta: float = pydantic.Field(0.2, ge=0.0, lt=0.5)
    """Trimmed mean: share cut from each end per coordinate."""
    server_learning_rate: float = pydantic.Field(1.0, gt=0.0)
    """Step size on the aggregated update."""
    round_deadline_s: float | None = pydantic.Field(None, gt=0.0)
    """Seconds after which a round aggregates what has arrived; None waits for every client."""
    dropout_rate: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    """Injected: chance that a sampled client never replies."""
    slow_rate: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    """Injected: chance that a sampled client is slowed by slowdown_s."""
    slowdown_s: float = pydantic.Field(0.0, ge=0.0)
    """Injected delay of a slowed client."""
    corrupt_rate: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    """Injected: chance that a sampled client sends NaN instead of its update."""
    max_update_norm: float | None = pydantic.Field(None, gt=0.0)
    """Reject client updates longer than this (non-finite updates are always rejected)."""
    dp: bool = False
    """DP-FedAvg: Poisson sampling, clipping, Gaussian noise and an accountant."""
    noise_multiplier: float | None = pydantic.Field(None, ge=0.0)
    """z; None computes the smallest z for target_epsilon over all rounds."""
    clip_norm: float = pydantic.Field(1.0, gt=0.0)
    """C, the L2 bound on each client's update."""
    sample_rate: float = pydantic.Field(0.1, gt=0.0, le=1.0)
    """q, each client's chance of joining a DP round."""
    delta: float = pydantic.Field(1e-5, gt=0.0, lt=1.0)
    """δ of the (ε, δ) guarantee."""
    target_epsilon: float | None = pydantic.Field(None, gt=0.0)
    """Stop before ε would pass this."""
    accountant: Literal["pld", "rdp"] = "pld"
    """pld (tightest) or rdp."""
    num_actors: int | None = pydantic.Field(None, ge=1)
    """Client actors in the pool; None uses one per CPU (or per GPU) of the cluster."""
    eval_every: int = pydantic.Field(1, ge=1)
    """Rounds between evaluations on the dev split (the last round is always evaluated, on test too)."""
    seed: int = 0
    """Seeds the partition, sampling, faults, local shuffling and the initial model; under dp the sampling and the
    noise come from the operating system's CSPRNG instead (the seed is public)."""
    output_dir: str = "runs/federated"
    """Folder for the final model, written by the driver (made absolute)."""
    experiment_name: str = "federated"
    """MLflow experiment the run is logged under."""

    @pydantic.model_validator(mode="after")
    def _dp_has_noise(self) -> FederatedConfig:
        if self.dp and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp needs noise_multiplier or target_epsilon")
        if self.dp and self.writers != "private":
            raise ValueError("dp needs writers: private, so that the clients are the private writers and evaluation "
                             "during training reads public writers only")
        if self.dp and self.max_update_norm is not None:
            raise ValueError("dp clips every update to clip_norm; max_update_norm would reject by a private statistic")
        if self.strategy == "fedprox" and self.optimizer == "sgd" and self.proximal_mu * self.learning_rate >= 2:
            # SGD on the proximal term alone multiplies the distance to the global model by (1 - lr·μ) each step
            raise ValueError(f"fedprox with sgd diverges when proximal_mu * learning_rate >= 2, got "
                             f"{self.proximal_mu} * {self.learning_rate}")
        return self
