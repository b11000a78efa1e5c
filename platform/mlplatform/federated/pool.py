"""A fixed pool of Ray actors that trains any number of virtual clients, under a round deadline."""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import numpy as np
import psutil
import ray
from ray.actor import ActorHandle

from mlplatform.federated.client import FederatedClient, RoundDeadline
from mlplatform.federated.config import ClientConfig
from mlplatform.federated.strategy import Failure, FitResult
from mlplatform.federated.task import FederatedTask

IN_FLIGHT_PER_ACTOR = 2
"""Calls queued on each actor: one running, one waiting, so an actor never idles for a round trip."""


@dataclasses.dataclass(frozen=True)
class ClientJob:
    """One virtual client's work in a round."""

    client_id: int
    indices: np.ndarray
    seed: int
    slowdown_s: float = 0.0
    corrupt: bool = False
    """Injected fault: the client sends NaN instead of its update (a diverged or buggy client)."""


@ray.remote
class ClientActor:
    """Holds one model and the task's data; trains whichever virtual client it is handed."""

    def __init__(self, task: FederatedTask, config: ClientConfig) -> None:
        self.client = FederatedClient(task, config)

    def fit(self, job: ClientJob, global_weights: np.ndarray, proximal_mu: float, deadline: float | None) -> FitResult | Failure:
        try:
            result = self.client.fit(job.client_id, global_weights, job.indices, seed=job.seed, proximal_mu=proximal_mu,
                                     deadline=deadline, slowdown_s=job.slowdown_s)
        except RoundDeadline:
            return Failure(job.client_id, "deadline")
        if job.corrupt:
            result.delta[:] = np.nan
        return result

    def resident_bytes(self) -> int:
        """This actor's resident memory."""
        return psutil.Process().memory_info().rss


class ClientPool:
    """``num_actors`` client actors, spread over the cluster's nodes; memory stays flat however many clients and rounds there are.

    An actor that dies (its node lost, most often) is replaced, and the clients it was training are
    handed to the actors still alive, within the same round and its deadline; a replacement takes
    clients once it has built its model.

    Args:
        task: the model and data each actor builds once.
        config: local training settings.
        num_actors: actors in the pool (about one per core, or per GPU).
        num_cpus: CPUs reserved per actor.
        num_gpus: GPUs reserved per actor (0 on CPU-only machines).
    """

    def __init__(self, task: FederatedTask, config: ClientConfig, *, num_actors: int,
                 num_cpus: float = 1.0, num_gpus: float = 0.0) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got num_actors={num_actors}")
        self._factory = ClientActor.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy="SPREAD")
        self._task, self._config = task, config
        self.actors: list[ActorHandle] = [self._start() for _ in range(num_actors)]
        self.starting: dict[ray.ObjectRef, int] = {}
        """Replacement actors still building their model: their first call, and their slot."""
        self.actors_replaced = 0
        self.clients_retried = 0
        # wait until every actor has built its model (round deadlines time training only); a bad task fails here
        ray.get([actor.resident_bytes.remote() for actor in self.actors])

    def _start(self) -> ActorHandle:
        return self._factory.remote(self._task, self._config)

    def _replace(self, slot: int, dead: ActorHandle) -> None:
        if self.actors[slot] is not dead:  # a second call on the same dead actor must not replace its successor
            return
        ray.kill(dead)  # it may be alive with its answer lost; a slot holds one actor
        self.actors[slot] = self._start()
        self.starting[self.actors[slot].resident_bytes.remote()] = slot
        self.actors_replaced += 1

    def run_round(
        self, weights: np.ndarray, jobs: list[ClientJob], *, proximal_mu: float = 0.0, deadline_s: float | None = None
    ) -> tuple[list[FitResult], list[Failure]]:
        """Train ``jobs`` from ``weights`` and collect what arrives before ``deadline_s`` seconds have passed.

        The weights go into the object store once and every call reads that one copy. Clients not
        finished at the deadline are reported as failures (``deadline``). A client whose actor died
        is trained again on another actor, once; if that fails too it is reported as ``error``.
        """
        deadline = None if deadline_s is None else time.time() + deadline_s
        weights_ref = ray.put(weights)
        waiting = deque(jobs)
        retried: set[int] = set()
        running: dict[ray.ObjectRef, tuple[int, ActorHandle, ClientJob]] = {}
        load = [0] * len(self.actors)
        results: list[FitResult] = []
        failures: list[Failure] = []
        while waiting or running:
            ready_slots = set(range(len(self.actors))) - set(self.starting.values())
            for slot in sorted(ready_slots):
                while waiting and load[slot] < IN_FLIGHT_PER_ACTOR:
                    job = waiting.popleft()
                    actor = self.actors[slot]
                    running[actor.fit.remote(job, weights_ref, proximal_mu, deadline)] = (slot, actor, job)
                    load[slot] += 1
            timeout = None if deadline is None else max(deadline - time.time(), 0.0)
            done, _ = ray.wait([*running, *self.starting], num_returns=1, timeout=timeout)
            if not done:  # the deadline passed: whatever is still out is a straggler
                failures += [Failure(job.client_id, "deadline") for *_, job in running.values()]
                failures += [Failure(job.client_id, "deadline") for job in waiting]
                break
            if done[0] in self.starting:
                self._started(done[0])
                continue
            slot, actor, job = running.pop(done[0])
            load[slot] -= 1
            try:
                outcome = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):  # the actor, or its answer, went with a node
                self._replace(slot, actor)
                if job.client_id not in retried:  # its client trains again on an actor still alive
                    retried.add(job.client_id)
                    self.clients_retried += 1
                    waiting.appendleft(job)
                    continue
                outcome = Failure(job.client_id, "error")
            (results if isinstance(outcome, FitResult) else failures).append(outcome)
        return sorted(results, key=lambda r: r.client_id), sorted(failures, key=lambda f: f.client_id)

    def _started(self, ref: ray.ObjectRef) -> None:
        """A replacement answered its first call (ready for clients), or died too (replaced again)."""
        slot = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            self._replace(slot, self.actors[slot])

    def resident_bytes(self) -> int:
        """Resident memory of the pool's ready actors together (it should stay flat from round to round)."""
        starting = set(self.starting.values())
        total = 0
        for ref in [actor.resident_bytes.remote() for slot, actor in enumerate(self.actors) if slot not in starting]:
            try:
                total += ray.get(ref)
            except ray.exceptions.RayActorError:  # died since the round; the next round replaces it
                pass
        return total

    def shutdown(self) -> None:
        """Stop every actor."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
