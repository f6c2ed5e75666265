"""The run's storage: the same calls on a local folder and on S3 (a real S3 endpoint: moto's
server on 127.0.0.1, reached through pyarrow's own S3 client)."""

from __future__ import annotations

import os
import pickle
import stat
import threading
import uuid

import pyarrow as pa
import pytest
from fakes import wait_for

from kfold_ray.storage._checkpoints import CheckpointSync
from kfold_ray._exceptions import StorageError
from kfold_ray.storage._storage import Storage, is_uri


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "run")
    s3 = request.getfixturevalue("s3")
    return Storage(f"{s3.new_bucket()}/runs/{uuid.uuid4().hex[:8]}")


def test_round_trip_list_and_delete(storage):
    assert storage.is_empty() and not storage.exists("a.json")
    storage.write_json("a.json", {"x": 1})
    storage.write_bytes("parts/fold_000/00000000.arrow", b"abc")
    storage.write_bytes("parts/fold_000/00000001.arrow", b"de")
    assert storage.read_json("a.json") == {"x": 1}
    assert storage.is_file("a.json") and storage.is_dir("parts") and not storage.is_empty()
    assert storage.list_names("parts/fold_000") == ["00000000.arrow", "00000001.arrow"]
    assert storage.list_names("nowhere") == []
    storage.delete("parts/fold_000/00000000.arrow")
    storage.delete("parts/fold_000/00000000.arrow")  # twice: no error
    assert storage.list_names("parts/fold_000") == ["00000001.arrow"]
    storage.delete_dir("parts")
    assert not storage.exists("parts/fold_000/00000001.arrow")


def test_staged_files_land_whole_or_not_at_all(storage, tmp_path):
    with storage.staged("predictions.parquet") as tmp:
        tmp.write_bytes(b"PAR1 all of it")
    assert storage.read_bytes("predictions.parquet") == b"PAR1 all of it"
    with pytest.raises(OSError, match="disk full"):
        with storage.staged("half.parquet") as tmp:
            tmp.write_bytes(b"PAR1 half")
            raise OSError("disk full")
    assert not storage.exists("half.parquet")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    storage.put_file(src, "weights/big.bin")
    assert storage.get_file("weights/big.bin", tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_arrow_reads_random_access(storage):
    table = pa.table({"a": list(range(1000))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    storage.write_bytes("t.arrow", sink.getvalue().to_pybytes())
    assert pa.ipc.open_file(storage.open_input_file("t.arrow")).read_all().equals(table)


def test_pickles_as_its_uri(storage):
    back = pickle.loads(pickle.dumps(storage))
    assert back.uri == storage.uri and type(back.fs) is type(storage.fs)
    storage.write_text("x.txt", "hi")
    assert back.read_text("x.txt") == "hi"


def test_local_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        Storage(tmp_path).write_text("run.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Storage("runs/mine")
    assert s.uri == str(tmp_path / "runs" / "mine") and s.is_local and not is_uri(s.uri)


def test_unknown_scheme_is_one_line_naming_the_location():
    with pytest.raises(StorageError, match=r"run dir 'nosuch://b/run': cannot open storage with scheme 'nosuch'"):
        Storage("nosuch://b/run")


def test_check_usable_creates_nothing_locally(tmp_path):
    Storage(tmp_path / "a" / "b").check_usable()
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        Storage(tmp_path / "f").check_usable()


def test_checkpoints_mirror_newest_and_resume_anywhere(storage, tmp_path):
    node_a = tmp_path / "node_a"
    sync = CheckpointSync(storage.child("folds/fold_000"), node_a, keep=2)
    assert sync.pull() is None
    for it in (1, 3, 5):
        (node_a / f"model_{it:07d}.pth").write_bytes(b"w%d" % it)
        (node_a / "last_checkpoint").write_text(f"model_{it:07d}.pth")
        (node_a / "log.txt").write_text(f"trained to {it}\n")
        assert sync.push() and not sync.push()  # the same checkpoint is uploaded once
    fold = storage.child("folds/fold_000")
    assert sorted(n for n in fold.list_names() if n.startswith("model_")) == [
        "model_0000003.pth", "model_0000005.pth"]
    assert fold.read_text("last_checkpoint") == "model_0000005.pth"
    node_b = tmp_path / "node_b"  # another node: nothing of node_a's disk
    again = CheckpointSync(fold, node_b)
    assert again.pull() == "model_0000005.pth"
    assert (node_b / "model_0000005.pth").read_bytes() == b"w5"
    assert (node_b / "log.txt").read_text() == "trained to 5\n"


class _GatedStorage(Storage):
    """A run dir whose checkpoint uploads each wait for `gate` (a slow S3, held as long as a test
    needs); the others go through. Records the uploads started."""

    def __init__(self, location, gate: threading.Event, fail: str = "") -> None:
        super().__init__(location)
        self.gate, self.fail, self.started = gate, fail, []

    def put_file(self, local, name: str) -> None:
        if name.startswith("model_"):
            self.started.append(name)
            assert self.gate.wait(60), "the test never opened the gate"
            if name == self.fail:
                raise OSError(f"upload of {name} failed")
        super().put_file(local, name)


def _checkpoint(node, iteration: int) -> str:
    name = f"model_{iteration:07d}.pth"
    (node / name).write_bytes(b"w%d" % iteration)
    (node / "last_checkpoint").write_text(name)
    return name


def test_background_uploads_leave_the_caller_free_and_land_one_at_a_time_in_order(tmp_path):
    gate = threading.Event()
    fold = _GatedStorage(tmp_path / "run" / "folds" / "fold_000", gate)
    node = tmp_path / "node"
    sync = CheckpointSync(fold, node, keep=5)
    sync.pull()
    first = _checkpoint(node, 1)
    assert sync.push_in_background()  # returns while its upload waits at the gate
    wait_for(lambda: fold.started == [first], 30, "the first upload to start")
    assert not fold.is_file("last_checkpoint"), "storage names no checkpoint before it holds it"
    assert not sync.push_in_background(), "a checkpoint is uploaded once"
    second = _checkpoint(node, 3)
    nxt = threading.Thread(target=sync.push_in_background)
    nxt.start()
    nxt.join(1.0)
    assert nxt.is_alive() and fold.started == [first], "the next upload waits for the previous"
    gate.set()
    nxt.join(30)
    sync.wait()
    assert fold.started == [first, second]
    assert fold.read_text("last_checkpoint") == second
    assert fold.read_bytes(first) == b"w1" and fold.read_bytes(second) == b"w3"


def test_a_failed_background_upload_is_raised_in_the_training_thread(tmp_path):
    gate = threading.Event()
    gate.set()
    fold = _GatedStorage(tmp_path / "run", gate, fail="model_0000001.pth")
    node = tmp_path / "node"
    sync = CheckpointSync(fold, node)
    sync.pull()
    _checkpoint(node, 1)
    assert sync.push_in_background()
    with pytest.raises(OSError, match="upload of model_0000001.pth failed"):
        sync.wait()
    assert not fold.is_file("last_checkpoint")
    final = "model_final.pth"
    (node / final).write_bytes(b"final")
    (node / "last_checkpoint").write_text(final)
    assert sync.push()  # in this thread, after the failed one: the final checkpoint lands
    assert fold.read_text("last_checkpoint") == final


def test_what_a_killed_upload_left_is_removed_by_the_next_writer(storage, tmp_path):
    fold = storage.child("folds/fold_000")
    fold.write_bytes(".model_0000003.pth.k2j4.tmp", b"half")  # a process killed mid-upload
    node = tmp_path / "node"
    sync = CheckpointSync(fold, node)
    sync.pull()
    _checkpoint(node, 3)
    assert sync.push()
    assert sorted(fold.list_names()) == ["last_checkpoint", "model_0000003.pth"]
