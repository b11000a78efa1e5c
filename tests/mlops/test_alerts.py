"""The shipped Prometheus alert rules are valid, and each fires on what should raise it (promtool's own rule tests)."""

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "cluster" / "prometheus-alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed (make test installs Debian's prometheus package, which ships it)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)


def test_the_rules_are_valid():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0 and "SUCCESS: 4 rules found" in checked.stdout, checked.stdout + checked.stderr


def test_each_alert_fires_on_its_series_and_not_on_the_others():
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_shipped_scrape_config_loads_the_rules():
    checked = promtool("check", "config", str(REPO / "cluster" / "prometheus.yml"))
    assert checked.returncode == 0 and "SUCCESS: 4 rules found" in checked.stdout, checked.stdout + checked.stderr
