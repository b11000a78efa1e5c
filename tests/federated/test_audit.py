"""The privacy audit: its statistics, its bound within the accounted ε for every shipped DP config, and its power."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest

from mlplatform.config import load_config
from mlplatform.federated.audit import (
    AuditConfig, audit, broken_copies, clopper_pearson_upper, epsilon_from_rates, one_round_epsilon,
)
from mlplatform.federated.config import FederatedConfig
from mlplatform.federated.privacy import DifferentialPrivacy, dp_from_config
from mlplatform.federated.strategy import FedAvg

REPO = Path(__file__).resolve().parents[2]
DP_CONFIGS = sorted(p for p in (REPO / "jobs/configs").glob("*.yaml") if yaml.safe_load(p.read_text()).get("dp"))


def test_clopper_pearson_is_scipys_exact_interval():
    for errors, trials in ((0, 1000), (7, 1000), (500, 1000), (1000, 1000)):
        expected = binomtest(errors, trials).proportion_ci(confidence_level=0.9, method="exact").high
        assert clopper_pearson_upper(errors, trials, 0.05) == pytest.approx(expected, rel=1e-9)
    assert clopper_pearson_upper(0, 1000, 0.05) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-9)


def test_error_rates_bound_epsilon_as_the_hypothesis_testing_view_of_dp_says():
    # FPR + e^ε·FNR ≥ 1 − δ: rates 0.01 and 0.5 force ε ≥ ln(0.5 / 0.01)
    assert epsilon_from_rates(0.01, 0.5, 0.0) == pytest.approx(np.log(50))
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0  # a coin toss proves nothing
    assert epsilon_from_rates(0.0, 0.3, 1e-5) == 0.0  # an upper bound of 0 cannot come from a finite test


def test_the_one_round_claim_is_the_gaussian_mechanisms_exact_epsilon():
    from scipy.optimize import brentq
    from scipy.stats import norm

    z, delta = 1.3, 1e-5
    mechanism = DifferentialPrivacy(FedAvg(), noise_multiplier=z, clip_norm=1.0, sample_rate=1.0, num_clients=10, delta=delta)
    # Balle & Wang 2018, Theorem 8: the Gaussian mechanism of std z (sensitivity 1) has δ(ε) = Φ(1/2z − εz) − e^ε Φ(−1/2z − εz)
    exact = brentq(lambda eps: norm.cdf(0.5 / z - eps * z) - np.exp(eps) * norm.cdf(-0.5 / z - eps * z) - delta, 0.01, 50)
    assert one_round_epsilon(mechanism) == pytest.approx(exact, rel=2e-3)  # PLD on its 1e-3 grid, pessimistic
    assert one_round_epsilon(mechanism) >= exact


@pytest.mark.parametrize("path", DP_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_dp_config_audits_within_its_accounted_epsilon_and_the_audit_catches_each_broken_copy(path):
    config = load_config(FederatedConfig, path)
    claimed = dp_from_config(config, FedAvg())
    settings = AuditConfig(trials=20_000, seed=0)
    honest = audit(lambda: dp_from_config(config, FedAvg()), claimed, settings)
    print(f"{path.name}: ε ≥ {honest.epsilon_lower_bound:.2f} measured, {honest.epsilon_accounted:.2f} accounted per round")
    assert not honest.violation
    assert honest.epsilon_lower_bound <= honest.epsilon_accounted <= config.target_epsilon
    assert honest.false_positive_rate < 1 and honest.false_negative_rate > 1 - config.sample_rate - 0.05
    for name, broken in broken_copies(claimed).items():
        caught = audit(broken, claimed, settings)
        print(f"  {name}: ε ≥ {caught.epsilon_lower_bound:.2f}")
        assert caught.violation, name


def test_the_cli_audits_a_config_and_refuses_one_without_dp(tmp_path):
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump({"dp": True, "writers": "private", "noise_multiplier": 1.0, "sample_rate": 0.2, "num_clients": 50,
                                      "rounds": 10}))
    cli = [sys.executable, "-m", "mlplatform.cli", "audit", "dp"]
    done = subprocess.run([*cli, "--config", str(config), "--trials", "4000", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout)
    assert line["noise_multiplier"] == 1.0 and line["num_clients"] == 50 and line["epsilon_run"] > 0
    audits = line["audits"]
    assert not audits["this mechanism"]["violation"]
    assert {name for name, a in audits.items() if a["violation"]} == {"noise 10x too small", "clipping off",
                                                                     "denominator from the replies"}
    refused = subprocess.run([*cli, "--set", "dp=false"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: config: dp is off; there is no privacy claim to audit (set dp: true)")
