"""`mlplatform cluster local` without starting a cluster: what a worker node hides, and the one-line refusals."""

import subprocess
import sys
from pathlib import Path

from mlplatform.localcluster import ClusterConfig, ClusterState
from mlplatform.raynodes import hidden_paths, isolated

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_a_worker_node_hides_the_drivers_temp_folders_outputs_stores_and_caches(monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", "/tmp/some-test-home")  # inside /tmp: hidden with it, not mounted twice
    folders, files = hidden_paths(REPO)
    assert Path("/tmp") in folders and Path("/tmp/some-test-home") not in folders
    assert {REPO / "runs", REPO / "checkpoints", REPO / "mlruns"} <= set(folders)
    assert {Path.home() / ".cache", Path.home() / ".ray"} <= set(folders)
    assert files == sorted(REPO.glob("mlruns.db*"))


def test_a_clone_under_tmp_stays_visible_on_a_node_while_its_outputs_and_the_rest_of_tmp_are_hidden(tmp_path):
    clone = tmp_path / "fresh"
    (clone / "platform").mkdir(parents=True)
    (clone / "platform" / "code.py").write_text("code\n")
    (clone / "runs").mkdir()
    (clone / "runs" / "written-by-the-driver").write_text("driver")
    (clone / "mlruns.db").write_text("store")
    (tmp_path / "elsewhere-in-tmp").write_text("driver")
    folders, files = hidden_paths(clone)
    assert Path("/tmp") in folders and clone / "runs" in folders and files == [clone / "mlruns.db"]
    look = (f"cat {clone}/platform/code.py; ls -A {clone}/runs | wc -l; wc -c < {clone}/mlruns.db; "
            f"test -e {tmp_path}/elsewhere-in-tmp && echo visible || echo hidden; pwd; echo $HOME")
    seen = subprocess.run(isolated(["sh", "-c", look], folders=folders, files=files, repository=clone), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == ["code", "0", "0", "hidden", str(clone), "/tmp/home"]
    assert (clone / "runs" / "written-by-the-driver").read_text() == "driver"  # the driver's own view is untouched


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlplatform"), "cluster", "local", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cluster_commands_without_a_cluster_say_so_in_one_line(tmp_path):
    for command in (["kill-node", "w1"], ["start-node", "w1"]):
        done = run_cli(*command, "--home", str(tmp_path))
        assert done.returncode == 2 and "no cluster is running" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("down", "--home", str(tmp_path))
    assert done.returncode == 0 and "nothing of the cluster" in done.stdout


def test_cluster_up_refuses_a_taken_port_before_starting_anything(tmp_path, taken_port):
    done = run_cli("up", "--set", f"home={tmp_path}", "--set", f"s3_port={taken_port}")
    assert done.returncode == 1 and f"port {taken_port} (s3_port) is in use" in done.stderr and "Traceback" not in done.stderr
    assert ClusterState.load(tmp_path) is None


def test_the_default_cluster_is_a_head_and_two_isolated_workers_with_s3():
    config = ClusterConfig()
    assert config.workers == 2 and config.wants_s3() and "s3_port" in config.ports()
    assert not ClusterConfig(workers=0).wants_s3()
