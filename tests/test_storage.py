"""Storage every node reaches: paths and URIs under the storage root, a real S3 API server, and folders carried by value."""

import os
import pickle
import threading

import pytest

from mlplatform import storage
from mlplatform.services import ServiceState, free_port, start_s3
from mlplatform.storage import PortableFolder, StorageError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 API server on loopback with one bucket; the AWS environment that reaches it is set meanwhile."""
    state = ServiceState(str(tmp_path_factory.mktemp("s3")))
    env = start_s3(state, port=free_port(), bucket="bucket", timeout_s=60)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env
    state.stop_all()


def test_relative_locations_go_under_the_storage_root_when_one_is_set(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    assert storage.resolve("checkpoints/apex") == str(tmp_path / "checkpoints" / "apex")
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://bucket/team/")
    assert storage.resolve("checkpoints/apex") == "s3://bucket/team/checkpoints/apex"
    assert storage.resolve("./runs/../checkpoints") == "s3://bucket/team/checkpoints"
    assert storage.resolve("/abs/path") == "/abs/path"  # a path the user chose stays theirs
    assert storage.resolve("gs://other/x") == "gs://other/x"
    assert storage.join("s3://bucket/a/", "b", "c.pt") == "s3://bucket/a/b/c.pt"


def test_a_local_write_replaces_the_file_whole_and_leaves_no_scratch(tmp_path):
    target = str(tmp_path / "deep" / "latest.pt")
    storage.write_bytes(target, b"first")
    storage.write_bytes(target, b"second")
    assert storage.read_bytes(target) == b"second" and storage.exists(target)
    assert os.listdir(tmp_path / "deep") == ["latest.pt"]
    with pytest.raises(FileNotFoundError, match="nothing stored at"):
        storage.read_bytes(str(tmp_path / "missing.pt"))


def test_s3_round_trip_through_a_real_s3_api(s3):
    location = "s3://bucket/runs/apex/latest.pt"
    assert not storage.exists(location)
    storage.write_bytes(location, b"\x00" * 3_000_000)  # large enough for a multipart upload
    assert storage.exists(location) and len(storage.read_bytes(location)) == 3_000_000
    storage.write_bytes("s3://bucket/runs/tune/study-2/info.json", b"{}")
    assert storage.list_folders("s3://bucket/runs") == ["apex", "tune"]
    assert storage.list_folders("s3://bucket/nothing-here") == []
    with pytest.raises(FileNotFoundError, match="nothing stored at 's3://bucket/runs/none.pt'"):
        storage.read_bytes("s3://bucket/runs/none.pt")


def test_storage_errors_name_the_location_without_credentials(s3):
    with pytest.raises(StorageError) as failed:
        storage.write_bytes("s3://user:secret@no-such-bucket/x.pt?access_key=AKIA123", b"x")
    message = str(failed.value)
    assert "no-such-bucket/x.pt" in message
    assert "secret" not in message and "AKIA123" not in message and s3["AWS_SECRET_ACCESS_KEY"] not in message


def test_a_portable_folder_travels_by_value_and_unpacks_once_per_node(tmp_path):
    source = tmp_path / "tokenizer"
    (source / "sub").mkdir(parents=True)
    (source / "vocab.txt").write_text("[PAD]\n[UNK]\n", encoding="utf-8")
    (source / "sub" / "config.json").write_bytes(b"{}")
    carried = pickle.loads(pickle.dumps(PortableFolder.read(source)))  # what Ray's object store does to it
    node_cache = tmp_path / "other-node"
    places = []
    threads = [threading.Thread(target=lambda: places.append(carried.materialize(node_cache))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(places)) == 1 and places[0].parent == node_cache / "portable"
    assert (places[0] / "vocab.txt").read_text(encoding="utf-8") == "[PAD]\n[UNK]\n"
    assert (places[0] / "sub" / "config.json").read_bytes() == b"{}"
    assert sorted(p.name for p in (node_cache / "portable").iterdir()) == [places[0].name]  # no scratch left behind
    (source / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")
    assert PortableFolder.read(source).digest != carried.digest  # another version never reuses the old copy
    assert storage.portable("cl-tohoku/bert-base-japanese-v3") == "cl-tohoku/bert-base-japanese-v3"  # a hub name stays a name
