"""`mlplatform audit dp`: measure a lower bound on a DP config's ε with canary clients, and show the audit can catch a broken mechanism."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from mlplatform.cli_options import ConfigOption, SetOption, fail, load_run_config

audit_app = typer.Typer(help="Check privacy claims by measurement.", no_args_is_help=True)


@audit_app.command("dp")
def audit_dp_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    trials: Annotated[int, typer.Option(min=100, help="Rounds run with and without the canary (each).")] = 20_000,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Confidence of the lower bound.")] = 0.95,
    power: Annotated[bool, typer.Option(help="Also audit three deliberately broken copies, which must be caught.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line instead of text.")] = False,
) -> None:
    """Audit the DP-FedAvg aggregation a federated config runs: an empirical ε lower bound against the accounted ε.

    Exits 1 when the measured bound exceeds what the accountant claims for one round.
    """
    from mlplatform.federated.config import FederatedConfig

    run_config = load_run_config(FederatedConfig, config, set_)
    if not run_config.dp:
        fail("config: dp is off; there is no privacy claim to audit (set dp: true)")
    from mlplatform.federated.audit import AuditConfig, audit, audit_config, broken_copies

    settings = AuditConfig(trials=trials, confidence=confidence)
    claimed, mine = audit_config(run_config, settings)
    results = {"this mechanism": mine}
    if power:
        results |= {name: audit(make, claimed, settings) for name, make in broken_copies(claimed).items()}
    run_epsilon = claimed.accountant.epsilon_after(noise_multiplier=claimed.noise_multiplier,
                                                   sample_rate=claimed.sample_rate, rounds=run_config.rounds)
    if as_json:
        typer.echo(json.dumps({
            "noise_multiplier": claimed.noise_multiplier, "clip_norm": claimed.clip_norm, "sample_rate": claimed.sample_rate,
            "num_clients": claimed.num_clients, "delta": run_config.delta, "rounds": run_config.rounds,
            "epsilon_run": run_epsilon, "trials": trials, "confidence": confidence,
            "audits": {name: dataclasses.asdict(r) | {"violation": r.violation} for name, r in results.items()}}))
    else:
        typer.echo(f"audit of DP-FedAvg: z = {claimed.noise_multiplier:.3f}, C = {claimed.clip_norm:g}, "
                   f"q = {claimed.sample_rate:g}, N = {claimed.num_clients}, δ = {run_config.delta:g}; "
                   f"{trials:,} rounds with and without a canary, {confidence:.0%} confidence")
        typer.echo(f"accounted: ε = {mine.epsilon_accounted:.2f} for one round, {run_epsilon:.2f} for the run's "
                   f"{run_config.rounds} rounds")
        for name, result in results.items():
            verdict = "VIOLATION" if result.violation else "consistent"
            if name != "this mechanism":
                verdict = "caught" if result.violation else "NOT caught (too few trials to see it)"
            typer.echo(f"  {name}: ε ≥ {result.epsilon_lower_bound:.2f} measured: {verdict}")
    if mine.violation:
        raise typer.Exit(code=1)
