"""The Serve app on a real local Ray: registered @champion models over real HTTP, bad input, alias rollout."""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from ray import serve

from mlplatform.emotion.data import load_corpus
from mlplatform.emotion.labels import EMOTIONS
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.emotion.tokenizer import default_tokenizer
from mlplatform.mlops.registry import ModelRegistry
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.rl.agent import DQNAgent, DQNConfig
from mlplatform.rl.policy import Policy
from mlplatform.serving.app import build_app
from mlplatform.serving.pyfunc import register_servable
from mlplatform.services import ServiceState, free_port, wait_http

from mlplatform.serving.deployments import PROBE_TEXT

BIN = Path(sys.executable).parent
FEARFUL = "明日の試験が怖くて眠れない"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """Three logical CPUs (on however many cores): the ingress, one emotion and two policy replicas."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def register_emotion(store, folder, seed, alias=None, *, nan_token_of=None):
    """A small emotion model as a new version; ``nan_token_of``: a text one of whose tokens (none of the rollout
    probe's) gets NaN embeddings, so the version passes its probe and yields NaN only for texts with that token."""
    tokenizer = default_tokenizer([e.text for e in load_corpus() if e.split == "train"], vocab_size=2000)
    torch.manual_seed(seed)
    model = EmotionClassifier.from_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    if nan_token_of is not None:
        probe_ids = set(tokenizer(PROBE_TEXT)["input_ids"])
        token = next(i for i in tokenizer(nan_token_of)["input_ids"] if i not in probe_ids)
        with torch.no_grad():
            model.model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with ExperimentTracker("serving", tracking_uri=store) as tracker:
        tracker.log_artifact(folder, artifact_path="model")
    registry = ModelRegistry(store)
    version = register_servable(registry, "emotion", run_id=tracker.run_id)
    return registry.set_alias("emotion", alias, version.version) if alias else version


def promote_broken_version(store, tmp):
    """Register an emotion version whose folder holds no weights and point @champion at it."""
    broken = tmp / "broken" / "best"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    with ExperimentTracker("serving", tracking_uri=store) as tracker:
        tracker.log_artifact(broken, artifact_path="model")
    registry = ModelRegistry(store)
    registry.set_alias("emotion", "champion", registry.register_model("emotion", run_id=tracker.run_id).version)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    store = f"sqlite:///{tmp}/m.db"
    register_emotion(store, tmp / "e1" / "best", seed=1, alias="champion")
    register_emotion(store, tmp / "e2" / "best", seed=2)
    agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(16, 16)))
    with torch.no_grad():  # weights large enough that observations near float32's limit overflow inside the network
        for parameter in agent.online.parameters():
            parameter.mul_(100.0)
    pong = DQNAgent((4, 84, 84), 6, DQNConfig(env_id="ALE/Pong-v5"))
    registry = ModelRegistry(store)
    for name, policy in (("cartpole", agent), ("pong", pong)):
        with ExperimentTracker("serving", tracking_uri=store) as tracker:
            tracker.log_checkpoint(policy.save(tmp / f"{name}.pt"))
        registry.set_alias(name, "champion", register_servable(registry, name, run_id=tracker.run_id).version)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"emotion_models": ["emotion"], "policies": ["cartpole", "pong"], "tracking_uri": store}),
              name="mlplatform", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "tmp": tmp}
    serve.shutdown()


def call(url, body=None, *, raw=None, method=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text or b"null")
        except json.JSONDecodeError:
            raise AssertionError(f"{e.code} with a body that is not JSON: {text[:200]!r}") from None


def test_emotion_predictions_match_the_registered_champion(served):
    texts = ["明日の試験が怖くて眠れない", "友達が誕生日を祝ってくれて本当に嬉しい"]
    status, answer = call(f"{served['url']}/v1/emotion", {"text": texts})
    assert status == 200 and answer["model"] == "emotion" and answer["version"] == "1", answer
    local = EmotionPredictor(served["tmp"] / "e1" / "best").predict(texts)
    for got, want in zip(answer["predictions"], local):
        assert got["label"] == want.label in EMOTIONS
        assert got["scores"] == pytest.approx(want.scores, abs=1e-5)
    status, single = call(f"{served['url']}/v1/emotion", {"text": texts[0]})
    assert status == 200 and len(single["predictions"]) == 1
    assert call(f"{served['url']}/v1/emotion/emotion", {"text": texts}) == (200, answer)  # the first model is the default
    status, missing = call(f"{served['url']}/v1/emotion/nope", {"text": texts})
    assert status == 404 and "deployed: ['emotion']" in missing["detail"]


def test_policy_answers_the_greedy_action(served):
    observation = [0.01, -0.2, 0.03, 0.1]
    status, answer = call(f"{served['url']}/v1/policy/cartpole", {"observation": observation})
    assert status == 200 and answer["version"] == "1"
    q_values = Policy(served["tmp"] / "cartpole.pt").q_values(observation)
    assert answer["action"] == int(np.argmax(q_values)) and answer["q_values"] == pytest.approx(q_values.tolist(), rel=1e-5)


def test_an_atari_frame_stack_is_answered_as_base64_or_nested_lists(served):
    frames = np.random.default_rng(0).integers(0, 256, (4, 84, 84), dtype=np.uint8)
    encoded = {"observation_b64": base64.b64encode(frames.tobytes()).decode(), "shape": [4, 84, 84]}
    status, answer = call(f"{served['url']}/v1/policy/pong", encoded)
    assert status == 200 and answer["model"] == "pong" and len(answer["q_values"]) == 6, answer
    q_values = Policy(served["tmp"] / "pong.pt").q_values(frames)
    assert answer["q_values"] == pytest.approx(q_values.tolist(), abs=1e-6)
    assert call(f"{served['url']}/v1/policy/pong", {"observation": frames.tolist()}) == (200, answer)  # 130 kB of JSON
    assert call(f"{served['url']}/v1/policy/pong", {"observation": frames.ravel().tolist()}) == (200, answer)
    status, wrong = call(f"{served['url']}/v1/policy/pong", {**encoded, "shape": [4, 84, 84, 1]})
    assert status == 422 and "expected shape [4, 84, 84]" in json.dumps(wrong), wrong
    status, wrong = call(f"{served['url']}/v1/policy/cartpole", encoded)  # capped by the policy's own size
    assert status == 422 and "expected 4 values" in json.dumps(wrong), wrong


def test_mlflow_loads_each_registered_model_and_answers_as_the_endpoint(served, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["store"])
    texts = ["明日の試験が怖くて眠れない", "友達が誕生日を祝ってくれて本当に嬉しい"]
    emotion = mlflow.pyfunc.load_model("models:/emotion@champion")
    assert emotion.metadata.get_input_schema().input_names() == ["text"] and emotion.metadata.saved_input_example_info
    answered = emotion.predict(pd.DataFrame({"text": texts})).to_dict("records")
    _, endpoint = call(f"{served['url']}/v1/emotion", {"text": texts})
    for got, want in zip(answered, endpoint["predictions"]):
        assert got["label"] == want["label"] and {e: got[e] for e in EMOTIONS} == pytest.approx(want["scores"], abs=1e-5)

    policy = mlflow.pyfunc.load_model("models:/cartpole@champion")
    assert policy.metadata.get_input_schema().inputs[0].shape == (-1, 4) and policy.metadata.saved_input_example_info
    observation = [0.01, -0.2, 0.03, 0.1]
    acted = policy.predict(np.array([observation], dtype=np.float32)).to_dict("records")[0]
    _, endpoint = call(f"{served['url']}/v1/policy/cartpole", {"observation": observation})
    assert acted["action"] == endpoint["action"] and acted["q_values"] == pytest.approx(endpoint["q_values"], abs=1e-6)


def test_mlflow_models_serve_answers_on_loopback(served, tmp_path):
    state, port = ServiceState(home=str(tmp_path)), free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["store"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = state.launch("mlflow-models-serve", [str(BIN / "mlflow"), "models", "serve", "-m", "models:/emotion@champion",
                                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", process, timeout_s=180)
        text = "明日の試験が怖くて眠れない"
        status, answer = call(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"text": text}]})
        _, endpoint = call(f"{served['url']}/v1/emotion", {"text": text})
        assert status == 200 and answer["predictions"][0]["label"] == endpoint["predictions"][0]["label"]
        assert {e: answer["predictions"][0][e] for e in EMOTIONS} == pytest.approx(endpoint["predictions"][0]["scores"], abs=1e-5)
        status, refused = call(f"http://127.0.0.1:{port}/invocations", {"inputs": {"text": [""]}})
        # MLflow's server names the input, then the model's own message; no traceback
        assert status == 400 and refused["message"].endswith("Error: text 0 is empty") and "stack_trace" not in refused, refused
    finally:
        state.stop_all()


def test_health_models_and_openapi(served):
    assert call(f"{served['url']}/healthz") == (200, {"status": "ok"})
    status, listed = call(f"{served['url']}/v1/models")
    assert status == 200
    assert {(m["name"], m["kind"], m["alias"]) for m in listed["models"]} == {
        ("emotion", "emotion", "champion"), ("cartpole", "dqn", "champion"), ("pong", "dqn", "champion")}
    status, schema = call(f"{served['url']}/openapi.json")
    assert status == 200 and {"/v1/emotion", "/v1/emotion/{name}", "/v1/policy/{name}", "/v1/models", "/healthz"} <= set(schema["paths"])



def rendered(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium, with every host name but 127.0.0.1 unresolvable."""
    chromium = shutil.which("chromium")
    assert chromium, "the API page test needs Debian's chromium (make test installs it)"
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                          "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_the_api_pages_render_their_operations_offline(served, tmp_path):
    swagger = rendered(f"{served['url']}/docs", tmp_path / "swagger")
    operations = {"/v1/emotion", "/v1/emotion/{name}", "/v1/policy/{name}", "/v1/models", "/healthz"}
    assert {path for path in operations if f'data-path="{path}"' in swagger} == operations, swagger[:2000]
    redoc = rendered(f"{served['url']}/redoc", tmp_path / "redoc")
    assert {"operation/classify_v1_emotion_post", "operation/act_v1_policy__name__post"} <= set(
        part.split('"')[1] for part in redoc.split("data-section-id=")[1:]), redoc[:2000]

MALFORMED = [
    ("/v1/emotion", b"{not json", 422),
    ("/v1/emotion", b"[]", 422),
    ("/v1/emotion", json.dumps({"text": 5}).encode(), 422),
    ("/v1/emotion", json.dumps({"text": ""}).encode(), 422),
    ("/v1/emotion", json.dumps({"text": ["ok", "   "]}).encode(), 422),
    ("/v1/emotion", json.dumps({"text": "あ" * 2001}).encode(), 422),
    ("/v1/emotion", json.dumps({"text": ["a"] * 65}).encode(), 422),
    ("/v1/emotion", json.dumps({"text": "a", "extra": 1}).encode(), 422),
    ("/v1/emotion", json.dumps({"text": "a" * 70_000}).encode(), 413),
    ("/v1/policy/cartpole", json.dumps({"observation": [1.0, 2.0, 3.0]}).encode(), 422),
    ("/v1/policy/cartpole", json.dumps({"observation": ["1", "2", "3", "4"]}).encode(), 422),
    ("/v1/policy/cartpole", json.dumps({"observation": [1e309, 0, 0, 0]}).encode(), 422),
    ("/v1/policy/cartpole", json.dumps({"observation": [1e39, 0, 0, 0]}).encode(), 422),  # finite in float64 only
    ("/v1/policy/cartpole", json.dumps({"observation": [3.4e38, 3.4e38, 3.4e38, 3.4e38]}).encode(), 422),  # NaN inside
    ("/v1/policy/cartpole", json.dumps({"observation": [[1, 2], [3]]}).encode(), 422),
    ("/v1/policy/cartpole", json.dumps({"observation": [1, 2, True, 4]}).encode(), 422),
    ("/v1/policy/cartpole", json.dumps({"observation": [1, 2, 3, 10**400]}).encode(), 422),
    ("/v1/policy/cartpole", json.dumps({"observation": [1, 2, 3, 4], "shape": [4]}).encode(), 422),
    ("/v1/policy/pong", json.dumps({"observation_b64": "not base64!", "shape": [4, 84, 84]}).encode(), 422),
    ("/v1/policy/pong", json.dumps({"observation_b64": "AAAA", "shape": [4, 84, 84]}).encode(), 422),
    ("/v1/policy/pong", json.dumps({"observation_b64": "AAAA"}).encode(), 422),
    ("/v1/policy/pong", json.dumps({"observation_b64": "AAAA", "shape": [3, -1]}).encode(), 422),
    ("/v1/policy/pong", json.dumps({"observation": [0] * 400_000}).encode(), 413),
    ("/v1/policy/cartpole", json.dumps({"obs": [1, 2, 3, 4]}).encode(), 422),
    ("/v1/policy/nosuch", json.dumps({"observation": [1, 2, 3, 4]}).encode(), 404),
]


def test_a_thousand_malformed_requests_get_4xx_and_the_service_still_answers(served):
    statuses = []
    for i in range(1000):
        path, raw, expected = MALFORMED[i % len(MALFORMED)]
        try:
            status, body = call(f"{served['url']}{path}", raw=raw)
        except AssertionError as e:
            raise AssertionError(f"{path} {raw[:80]!r}: {e}") from None
        assert status == expected, (path, raw[:80], status, body)
        statuses.append(status)
    assert all(400 <= s < 500 for s in statuses)
    status, body = call(f"{served['url']}/v1/policy/cartpole", raw=json.dumps({"observation": [1, 2, 3]}).encode())
    assert "observation" in json.dumps(body) and "expected 4 values" in json.dumps(body)
    assert call(f"{served['url']}/v1/emotion", {"text": "嬉しい"})[0] == 200


def wait_for(predicate, timeout_s=60.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_promoting_rolls_out_and_a_broken_version_is_rolled_back(served):
    texts = [FEARFUL, "友達が誕生日を祝ってくれて本当に嬉しい", "電車が止まって腹が立つ", "まさか当選するとは", "明日の旅行が楽しみ",
             "部屋が汚くて気持ち悪い", "先生の言葉を信じている", "祖母が亡くなって寂しい"]
    answers, stop = [], threading.Event()

    def multi_text_client() -> None:
        while not stop.is_set():
            answers.append(call(f"{served['url']}/v1/emotion", {"text": texts}))

    client = threading.Thread(target=multi_text_client)
    client.start()
    registry = ModelRegistry(served["store"])
    try:
        time.sleep(1)
        registry.set_alias("emotion", "champion", "2")
        assert wait_for(lambda: call(f"{served['url']}/v1/emotion", {"text": "嬉しい"})[1]["version"] == "2")
        time.sleep(1)
    finally:
        stop.set()
        client.join()
    # every multi-text answer came whole from the one version it names, across the swap
    local = {version: EmotionPredictor(served["tmp"] / f"e{version}" / "best").scores(texts) for version in ("1", "2")}
    assert np.abs(local["1"] - local["2"]).max() > 1e-3  # the two versions answer apart
    assert {answer["version"] for _, answer in answers} == {"1", "2"}
    for status, answer in answers:
        served_scores = np.array([[p["scores"][e] for e in EMOTIONS] for p in answer["predictions"]])
        assert status == 200 and np.abs(served_scores - local[answer["version"]]).max() < 1e-5

    promote_broken_version(served["store"], served["tmp"])

    def reported() -> bool:
        models = {m["name"]: m for m in call(f"{served['url']}/v1/models")[1]["models"]}
        return models["emotion"]["last_rollout_error"] is not None

    assert wait_for(reported)
    status, answer = call(f"{served['url']}/v1/emotion", {"text": "嬉しい"})
    assert status == 200 and answer["version"] == "2"  # the old version keeps serving


def test_a_version_yielding_nan_for_some_texts_answers_them_503_naming_the_model(served):
    version = register_emotion(served["store"], served["tmp"] / "e-nan" / "best", seed=3, alias="champion",
                               nan_token_of=FEARFUL).version
    assert wait_for(lambda: call(f"{served['url']}/v1/emotion", {"text": PROBE_TEXT})[1]["version"] == version)
    status, answer = call(f"{served['url']}/v1/emotion", {"text": [PROBE_TEXT, FEARFUL]})
    assert (status, answer) == (503, {"detail": f"model 'emotion' version {version} answered non-finite scores"})
    assert call(f"{served['url']}/v1/emotion", {"text": PROBE_TEXT})[0] == 200
