"""Nothing lost (kill -9 at any moment, Ctrl-C, SIGTERM, a full disk) and one writer per store."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import pytest

from polypure import Experiment
from polypure.cli import main
from polypure.config.settings import load_config
from polypure.store.inspection import describe
from polypure.store.write_session import StoreLockedError, WriteSession, whole_write, work_path

from .crash_harness import differences, run_harness

SMALL = ["data.synthetic.n=48", "topk.k=6", "topk.layers=[block_3]", "relevance.n_refs=6", "relevance.planted=null",
         "relevance.targets=[{layer: block_3, neurons: '0:4', attribution_layers: [block_2]}]"]


#: Kills of the long harness's test: three of each kind by default; ``python tests/crash_harness.py --kills 27``
#: runs the full harness.
KILLS = int(os.environ.get("POLYPURE_CRASH_KILLS", "9"))


@pytest.mark.long
def test_kill_9_at_any_moment_loses_nothing(tmp_path):
    # kills of each kind in turn: at a random moment, inside a store write, inside a commit
    tally = run_harness(tmp_path, kills=KILLS, seed=1, log=lambda line: None)
    per_kind = KILLS // 3
    assert tally.kills == KILLS and min(tally.by_kind.values()) >= per_kind
    assert tally.reruns_identical == tally.chains >= 1


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    store = tmp_path / "s.h5"
    Experiment(load_config("demo", [*SMALL, f"store={store}"]), progress=False).topk()
    before = store.read_bytes()
    with WriteSession(store):
        with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} on {socket.gethostname()} since 20"):
            Experiment(load_config("demo", [*SMALL, f"store={store}"]), progress=False).relevance()
        assert main(["relevance", "demo", "--set", *SMALL, f"store={store}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and str(store) in err[0]
        # reading works while the store is held for writing
        assert "block_3" in describe(store)
    assert store.read_bytes() == before


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path):
    store = tmp_path / "s.h5"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from polypure.store.write_session import WriteSession; "
        f"s = WriteSession({str(store)!r}).open(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            WriteSession(store).open()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # no flag needed: the system released the dead process's lock
    with WriteSession(store) as session:
        assert session.work_path == work_path(store)


def test_writes_are_whole_under_ctrl_c():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with whole_write():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append(True)  # the write went on to its end
    assert finished == [True]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_end_a_run_cleanly(tmp_path, signum, status):
    store = tmp_path / "s.h5"
    overrides = ["data.synthetic.n=240", "data.batch_size=8", "topk.checkpoint_every=1", "commit_every=0",
                 f"store={store}"]
    run = subprocess.Popen([sys.executable, "-m", "polypure", "topk", "demo", "--set", *overrides],
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    while not store.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert run.returncode == status, err
    assert "finished work is saved in the store" in err.strip().splitlines()[-1]
    with h5py.File(store, "r") as f:
        done = f["topk/block_3"].attrs["samples_done"]
        assert 0 < done <= 240
    assert not work_path(store).exists()
    # the rerun goes on from there and ends where an uninterrupted run ends
    assert main(["topk", "demo", "-q", "--set", *overrides]) == 0
    reference = tmp_path / "ref.h5"
    assert main(["topk", "demo", "-q", "--set", *overrides[:-1], f"store={reference}"]) == 0
    assert differences(reference, store) == ["/"]  # the store path in the stored config, nothing else


def test_a_full_disk_is_one_line_and_keeps_the_last_commit(tmp_path, capsys, monkeypatch):
    store = tmp_path / "s.h5"
    assert main(["topk", "demo", "-q", "--set", *SMALL, f"store={store}"]) == 0
    before = store.read_bytes()
    import shutil

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    assert main(["relevance", "demo", "-q", "--set", *SMALL, f"store={store}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(store) in err[0] and "the disk is full" in err[0] and "MiB" in err[0]
    assert store.read_bytes() == before
    assert not work_path(store).exists()
