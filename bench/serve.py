"""Benchmark: emotion endpoint requests/s and p50/p99 latency at 32 clients, the Serve app vs a plain-uvicorn peer, as one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import ray
import torch
from ray import serve

from quiet_stdout import stdout_to_stderr  # bench/ is on sys.path when a bench runs as a script
from mlplatform.emotion.data import load_corpus
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.emotion.tokenizer import default_tokenizer
from mlplatform.emotion.train import EmotionConfig
from mlplatform.mlops.registry import ModelRegistry
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.serving.app import Ingress
from mlplatform.serving.deployments import EmotionModel
from mlplatform.serving.pyfunc import register_servable

MODEL = "emotion"
TARGET_RATIO = 1.0
"""Serve requests/s over the peer's, at the same clients; its p99 must also be at most the peer's."""
PEER = Path(__file__).with_name("serve_peer.py")
HEADERS = {"Content-Type": "application/json"}
NOTES = (
    "peer: the same EmotionPredictor (same folder) behind a plain FastAPI app (bench/serve_peer.py, a sync endpoint, "
    "one predict call per request) on one uvicorn worker, no Ray, measured first on the quiet machine with the same "
    "clients and bodies; ratio_rps_vs_peer = batched / peer requests/s, p99_ratio_vs_peer = batched / peer p99. "
    "One Serve app as build_app makes it (FastAPI Ingress -> EmotionModel, one replica each, Ingress 0.25 CPU, "
    "EmotionModel 1 CPU) on an in-process Ray with --cpus CPUs, the default training model size (BERT hidden 128, "
    "2 layers, 4 heads, WordPiece vocabulary 6000 on the corpus' train split; untrained weights, which cost the same "
    "to run) registered @champion in a temporary MLflow SQLite store. Unbatched: the same deployment with "
    "user_config max_batch_size 1, batch_wait_timeout_s 0, measured first; batched: then the same replica "
    "reconfigured (serve.run with the new user_config), after its own warm-up. Load: N closed-loop aiohttp clients "
    "in the bench process, one POST /v1/emotion with one test-split sentence each, over keep-alive connections; "
    "rps counts 200s finished in the measured window after the warm-up; errors = non-200 or failed requests over "
    "warm-up and window. healthz: the same clients on GET /healthz (proxy + ingress, no model call), the HTTP "
    "path's ceiling here. model_only: EmotionPredictor.predict in the "
    "bench process on one torch thread (what the 1-CPU replica gets), batches of 1 and of max_batch_size, the "
    "model's ceiling. mean_batch: 200s of the phase (warm-up included) per model call, the calls counted by the "
    "replica's model_batch_size histogram on Ray's metrics port. cpu_busy: the whole machine's busy share over the "
    "window (/proc/stat); cores_by_process: CPU seconds per window second of each Ray actor (by name), raylet, "
    "gcs_server, this bench process (the clients and the Ray driver) and every other process. load_avg_1m: the machine's "
    "load when the bench started (cores shared with other work)."
)


def log(message: str) -> None:
    print(f"[serve-bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(store: str, folder: Path, settings: EmotionConfig, *, champion: bool = True) -> Path:
    """A default-size emotion model (seeded by ``settings.seed``) registered as a new ``emotion`` version; its folder."""
    tokenizer = default_tokenizer([e.text for e in load_corpus() if e.split == "train"], vocab_size=settings.vocab_size)
    torch.manual_seed(settings.seed)
    model = EmotionClassifier.from_config(tokenizer, target=settings.target, hidden_size=settings.hidden_size,
                                          num_layers=settings.num_layers, num_heads=settings.num_heads,
                                          dropout=settings.dropout, max_length=settings.max_length)
    best = folder / "best"
    model.save_pretrained(best)
    tokenizer.save_pretrained(best)
    with ExperimentTracker("serve-bench", tracking_uri=store) as tracker:
        tracker.log_artifact(best, artifact_path="model")
    registry = ModelRegistry(store)
    version = register_servable(registry, MODEL, run_id=tracker.run_id).version
    if champion:
        registry.set_alias(MODEL, "champion", version)
    return best


def model_only(folder: Path, texts: Sequence[str], batch_size: int, seconds: float) -> dict[str, float]:
    """Texts/s of ``EmotionPredictor.predict`` on one torch thread, for batches of 1 and of ``batch_size``."""
    predictor, threads = EmotionPredictor(folder), torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}
    try:
        for size in (1, batch_size):
            batches = [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(len(texts))]
            predictor.predict(batches[0])
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                predictor.predict(batches[done % len(batches)])
                done += 1
            result[f"rps_batch{size}"] = round(done * size / (time.perf_counter() - start), 1)
    finally:
        torch.set_num_threads(threads)
    return result


@ray.remote(num_cpus=1)
def torch_threads() -> int:
    """torch's thread count in a 1-CPU Ray worker, as the EmotionModel replica has."""
    return torch.get_num_threads()


def deploy(store: str, batching: dict[str, float], max_ongoing: int) -> None:
    """``build_app``'s emotion app, with these batch settings; a second call reconfigures the running replica."""
    model = EmotionModel.options(user_config=batching, max_ongoing_requests=max_ongoing).bind(MODEL, "champion", store)
    serve.run(Ingress.options(max_ongoing_requests=max_ongoing).bind({MODEL: model}, {}), name="mlplatform", route_prefix="/")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


PEER_PIDS: set[int] = set()


def process_ticks() -> dict[str, int]:
    """CPU jiffies so far by process group: each Ray actor by name, raylet, gcs_server, this bench, the peer, other."""
    ticks: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(proc.name) == os.getpid():
            group = "bench"
        elif int(proc.name) in PEER_PIDS:
            group = "peer"
        elif argv0.startswith("ray::"):
            group = argv0[5:].split(".")[0].replace("ServeReplica:mlplatform:", "")
        elif Path(argv0).name in ("raylet", "gcs_server"):
            group = Path(argv0).name
        else:
            group = "other"
        ticks[group] = ticks.get(group, 0) + int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def cores_by_process(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    """Cores each process group used between two ``process_ticks`` (groups under 0.01 cores left out)."""
    hz = os.sysconf("SC_CLK_TCK")
    used = {group: (ticks - before.get(group, 0)) / hz / seconds for group, ticks in after.items()}
    return {group: round(cores, 2) for group, cores in sorted(used.items(), key=lambda kv: -kv[1]) if cores >= 0.01}


def replica_totals(metrics_url: str) -> tuple[float, float] | None:
    """(requests, model calls) so far of the EmotionModel replica, from Ray's metrics port, or None.

    Model calls: the count of the ``model_batch_size`` histogram (exact; its ``_sum`` is not, as Ray reports
    each observation as its bucket's midpoint).
    """
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals = {"model_requests_total": 0.0, "model_batch_size_count": 0.0}
    for match in re.finditer(r'^(?:ray_)?(model_requests_total|model_batch_size_count)\{[^}]*deployment="EmotionModel"'
                             r'[^}]*\} (\S+)$', text, re.MULTILINE):
        totals[match[1]] += float(match[2])
    return totals["model_requests_total"], totals["model_batch_size_count"]


def settled_totals(metrics_url: str, requests: float, timeout_s: float = 45.0) -> tuple[float, float] | None:
    """``replica_totals`` once the replica has reported ``requests`` requests (metrics arrive every few seconds)."""
    deadline, totals = time.time() + timeout_s, None
    while time.time() < deadline:
        totals = replica_totals(metrics_url)
        if totals is not None and totals[0] >= requests:
            return totals
        time.sleep(1.0)
    return totals


async def client(session: aiohttp.ClientSession, method: str, url: str, bodies: Sequence[bytes], first: int,
                 step: int, stop_at: float, records: list[tuple[float, float, int]]) -> None:
    """One closed-loop client: a request, its answer, the next request, until ``stop_at``."""
    i = first
    while (start := time.perf_counter()) < stop_at:
        try:
            async with session.request(method, url, data=bodies[i % len(bodies)] if bodies else None,
                                       headers=HEADERS if bodies else None) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        end = time.perf_counter()
        records.append((end, end - start, status))
        i += step


async def load(method: str, url: str, bodies: Sequence[bytes], clients: int, warmup_s: float,
               duration_s: float, at_window_start: Callable[[], object] | None = None) -> dict[str, Any]:
    """``clients`` closed-loop clients for warm-up + duration; rps and latency over the measured window.

    ``at_window_start`` runs in a thread as the window opens (the rollout phase promotes a version there).
    """
    records: list[tuple[float, float, int]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        begin = time.perf_counter()
        window_start, stop_at = begin + warmup_s, begin + warmup_s + duration_s
        tasks = [client(session, method, url, bodies, c, clients, stop_at, records) for c in range(clients)]
        gather = asyncio.gather(*tasks)
        await asyncio.sleep(warmup_s)
        busy0, total0, procs0 = *cpu_ticks(), process_ticks()
        if at_window_start is not None:
            await asyncio.to_thread(at_window_start)
        await asyncio.sleep(max(stop_at - time.perf_counter(), 0.0))
        busy1, total1, procs1 = *cpu_ticks(), process_ticks()
        await gather
    window = [(lat, status) for end, lat, status in records if window_start <= end <= stop_at]
    latencies = np.array([lat for lat, status in window if status == 200]) * 1000
    return {"rps": round(len(latencies) / duration_s, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else None,
            "errors": sum(status != 200 for _, _, status in records),
            "requests_ok": sum(status == 200 for _, _, status in records),
            "cpu_busy": round((busy1 - busy0) / max(total1 - total0, 1), 3),
            "cores_by_process": cores_by_process(procs0, procs1, duration_s)}


def measure(url: str, bodies: Sequence[bytes], metrics_url: str, args: argparse.Namespace,
            at_window_start: Callable[[], object] | None = None) -> dict[str, Any]:
    """One phase on the deployed app, with the mean batch size the replica saw (warm-up included)."""
    before = settled_totals(metrics_url, 0.0)
    result = asyncio.run(load("POST", f"{url}/v1/emotion", bodies, args.clients, args.warmup, args.duration,
                              at_window_start))
    served = result.pop("requests_ok")
    after = settled_totals(metrics_url, before[0] + served) if before is not None else None
    if before is not None and after is not None and after[0] >= before[0] + served and after[1] > before[1]:
        result["mean_batch"] = round(served / (after[1] - before[1]), 2)
    return result


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Return once ``GET url`` answers 200; raise after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(0.5)


def measure_peer(folder: Path, bodies: Sequence[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """The peer (``serve_peer.py`` on one uvicorn worker, the same model folder) under the same load; stopped by pid."""
    port = free_port()
    env = {**os.environ, "SERVE_PEER_MODEL": str(folder), "PYTHONPATH": str(PEER.parent)}
    peer = subprocess.Popen([sys.executable, "-m", "uvicorn", f"{PEER.stem}:app", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--no-access-log"], env=env,
                            stdout=subprocess.DEVNULL, stderr=sys.stderr)
    PEER_PIDS.add(peer.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/healthz")
        result = asyncio.run(load("POST", f"{url}/v1/emotion", bodies, args.clients, args.warmup, args.duration))
    finally:
        peer.terminate()
        peer.wait(timeout=30)
    result.pop("requests_ok")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32, help="concurrent closed-loop HTTP clients")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase's window")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--max-batch-size", type=int, default=32, help="batched phase: max_batch_size")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="batched phase: batch_wait_timeout_s in ms")
    parser.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests of both deployments")
    args = parser.parse_args()
    load_avg = round(os.getloadavg()[0], 2)
    settings = EmotionConfig()
    texts = [e.text for e in load_corpus() if e.split == "test"]
    bodies = [json.dumps({"text": text}, ensure_ascii=False).encode() for text in texts]
    unbatched = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    batched = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000}
    report: dict[str, Any] = {"bench": "serve_emotion"}
    with tempfile.TemporaryDirectory() as folder, stdout_to_stderr():
        store = f"sqlite:///{folder}/mlflow.db"
        best = register(store, Path(folder), settings)
        report["model_only"] = model_only(best, texts, args.max_batch_size, seconds=3.0)
        log(f"model only: {report['model_only']}")
        report["peer"] = measure_peer(best, bodies, args)
        log(f"peer: {report['peer']}")
        port, metrics_port = free_port(), free_port()
        url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_port)
        try:
            replica_threads = ray.get(torch_threads.remote())
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            deploy(store, unbatched, args.max_ongoing)
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/emotion", data=bodies[0], headers=HEADERS),
                                        timeout=30) as response:
                assert json.loads(response.read())["version"] == "1"
            healthz = asyncio.run(load("GET", f"{url}/healthz", [], args.clients, args.warmup, args.duration))
            report["healthz"] = {k: v for k, v in healthz.items() if k != "requests_ok"}
            log(f"healthz: {report['healthz']}")
            report["unbatched"] = measure(url, bodies, metrics_url, args)
            log(f"unbatched: {report['unbatched']}")
            deploy(store, batched, args.max_ongoing)
            report["batched"] = measure(url, bodies, metrics_url, args)
            log(f"batched: {report['batched']}")
            register(store, Path(folder) / "v2", dataclasses.replace(settings, seed=settings.seed + 1), champion=False)
            promote = functools.partial(ModelRegistry(store).set_alias, MODEL, "champion", "2")
            report["batched_during_rollout"] = measure(url, bodies, metrics_url, args, at_window_start=promote)
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/emotion", data=bodies[0], headers=HEADERS),
                                        timeout=30) as response:
                report["batched_during_rollout"]["version_after"] = json.loads(response.read())["version"]
            log(f"batched during rollout: {report['batched_during_rollout']}")
        finally:
            serve.shutdown()
            ray.shutdown()
    ratio = report["batched"]["rps"] / report["peer"]["rps"]
    p99_ratio = report["batched"]["p99_ms"] / report["peer"]["p99_ms"]
    report |= {"ratio_rps_vs_peer": round(ratio, 3), "p99_ratio_vs_peer": round(p99_ratio, 3),
               "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO and p99_ratio <= 1.0,
               "ratio_batched_vs_unbatched": round(report["batched"]["rps"] / report["unbatched"]["rps"], 3),
               "rollout_p99_ratio": round(report["batched_during_rollout"]["p99_ms"] / report["batched"]["p99_ms"], 3)}
    report["settings"] = {
        "clients": args.clients, "warmup_s": args.warmup, "duration_s": args.duration, "ray_cpus": args.cpus,
        "batched": batched, "unbatched": unbatched, "max_ongoing_requests": args.max_ongoing,
        "model": {"hidden_size": settings.hidden_size, "num_layers": settings.num_layers,
                  "num_heads": settings.num_heads, "vocab_size": settings.vocab_size, "max_length": settings.max_length},
        "texts": len(texts), "mean_text_chars": round(float(np.mean([len(t) for t in texts])), 1),
        "torch_threads_replica": replica_threads, "load_avg_1m": load_avg,
    }
    report["versions"] = {"python": platform.python_version(),
                          **{name: version(name) for name in ("ray", "torch", "transformers", "fastapi", "uvicorn",
                                                               "aiohttp", "mlflow")}}
    report["notes"] = NOTES
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
