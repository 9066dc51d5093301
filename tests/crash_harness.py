"""Kill ``polypure run`` with SIGKILL at many moments and check that nothing finished is lost.

A small config runs every stage (demo model, planted and real targets, two rule variants, clustering,
evaluation, the report). First once without interruption: the reference store. Then in chains: a run
is started and killed, rerun with the same command and killed again, ... until a rerun finishes; the
finished store must equal the reference (every dataset, every attribute but the time stamp). The moments
are drawn from a seeded generator, the kinds in turn:

* ``time``: a random wall-clock moment of the run;
* ``write``: inside the N-th store write (``POLYPURE_TEST_KILL_AT=write:N``, after the data, before the
  flush, or between a chunk's relevance and its ``complete`` flags);
* ``commit``: inside the N-th commit, between copying the working copy and renaming it over the store.

After every kill the store (where one was committed yet) must open with plain h5py, every dataset and
attribute must read, and ``polypure inspect`` must describe it.

Run: ``python tests/crash_harness.py [--kills 25] [--seed 0]``; ``tests/test_crash.py`` runs a few.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

CONFIG = """\
name: crash
seed: 0
commit_every: 0
model: {name: demo_resnet, weights: DEFAULT}
data: {kind: synthetic, synthetic: {n: 160, size: 64, seed: 0}, image_size: null, normalize: auto,
       batch_size: 16, num_workers: 0}
topk: {layers: [block_3, logits], k: 8, statistic: max, checkpoint_every: 2}
relevance:
  targets:
    - {layer: logits, neurons: all, attribution_layers: [block_1, block_2]}
    - {layer: block_3, neurons: '0:8', attribution_layers: [block_1, block_2]}
  n_refs: 8
  batch_size: 16
  variants: [{id: default, composite: gradient}, {id: lrp, composite: epsilon_plus}]
  planted: {pairs: 3, layer: block_3, mode: [sum, max], seed: 0}
cluster: {methods: [{name: kmeans, n_clusters: 2}]}
evaluate: {ground_truth: [planted, shape], polysemantic_by: shape}
compare: {n_resamples: 1000}
report: {neurons: 1}
"""


def contents(path) -> dict:
    """Every dataset's values and every object's attributes, time stamps left out."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {key: np.asarray(value).tolist() for key, value in obj.attrs.items() if key != "created"}
            out[name] = (obj[()] if isinstance(obj, h5py.Dataset) else None, attrs)
        visit("/", f)
        f.visititems(visit)
    return out


def equal(a, b) -> bool:
    """Arrays equal in dtype, shape and values, NaN equal to NaN."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def differences(expected, actual) -> list[str]:
    """Names of the objects that differ between two stores (empty: the same store)."""
    a, b = contents(expected), contents(actual)
    out = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        (data_a, attrs_a), (data_b, attrs_b) = a[name], b[name]
        same = attrs_a == attrs_b
        if data_a is not None:
            # a table (compound dtype) compares field by field, so that NaN equals NaN in its float fields too
            fields = data_a.dtype.names or [None]
            same = same and data_a.dtype == data_b.dtype and data_a.shape == data_b.shape and all(
                equal(data_a if f is None else data_a[f], data_b if f is None else data_b[f]) for f in fields)
        if not same:
            out.append(name)
    return out


@dataclass
class Tally:
    """What the harness did."""

    kills: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {"time": 0, "write": 0, "commit": 0})
    finished_before_kill: int = 0
    no_store_yet: int = 0
    reruns_identical: int = 0
    chains: int = 0


def command(config: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "polypure", "run", str(config), "--set", f"store={store}", "-q"]


def check_readable(store: Path, env: dict) -> None:
    """The store opens with plain h5py, reads in full, and ``polypure inspect`` describes it."""
    contents(store)
    done = subprocess.run([sys.executable, "-m", "polypure", "inspect", str(store)], env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"polypure inspect failed after a kill: {done.stderr.strip()}")


def run_harness(folder: Path, kills: int, seed: int = 0, log=print) -> Tally:
    """Kill runs of the harness's config ``kills`` times; raise AssertionError at the first loss."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "crash.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "POLYPURE_TEST_KILL_AT"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                         env.get("PYTHONPATH", "")])
    # the reference is written at the same path as the killed runs (the path is part of the stored config)
    reference = folder / "reference.h5"
    store = folder / "store.h5"
    start = time.perf_counter()
    subprocess.run(command(config, store), env=env, check=True, capture_output=True, timeout=600)
    length = time.perf_counter() - start
    os.replace(store, reference)
    log(f"reference run: {length:.1f} s")
    rng = random.Random(seed)
    tally = Tally()
    while tally.kills < kills:
        # a chain: from nothing, killed and rerun until a rerun finishes
        for path in folder.glob("store.*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tally.chains += 1
        while True:
            # the kinds in turn, each at a random moment of its own
            kind = ["time", "write", "commit"][tally.kills % 3] if tally.kills < kills else None
            run_env = dict(env)
            if kind == "write":
                run_env["POLYPURE_TEST_KILL_AT"] = f"write:{rng.randint(1, 120)}"
            elif kind == "commit":
                run_env["POLYPURE_TEST_KILL_AT"] = f"commit:{rng.randint(1, 40)}"
            proc = subprocess.Popen(command(config, store), env=run_env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            try:
                if kind == "time":
                    try:
                        proc.wait(timeout=rng.uniform(0.5, 0.9 * length))
                    except subprocess.TimeoutExpired:
                        proc.send_signal(signal.SIGKILL)
                _, err = proc.communicate(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
            if proc.returncode == 0:
                if kind is not None:
                    tally.finished_before_kill += 1
                break
            if proc.returncode != -signal.SIGKILL:
                raise AssertionError(f"run failed with status {proc.returncode}: {err.strip()[-500:]}")
            tally.kills += 1
            tally.by_kind[kind] += 1
            if store.exists():
                check_readable(store, env)
            else:
                tally.no_store_yet += 1
        problems = differences(reference, store)
        if problems:
            raise AssertionError(f"chain {tally.chains}: the rerun's store differs from the reference at "
                                 f"{', '.join(problems[:5])}")
        tally.reruns_identical += 1
        log(f"chain {tally.chains}: {tally.kills} kill(s) so far, store identical to the reference")
    return tally


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    folder = args.folder or Path(os.environ.get("TMPDIR", "/tmp")) / f"polypure-crash-{os.getpid()}"
    start = time.perf_counter()
    tally = run_harness(folder, args.kills, args.seed)
    print(f"{tally.kills} kills ({tally.by_kind['time']} at random moments, {tally.by_kind['write']} inside store "
          f"writes, {tally.by_kind['commit']} inside commits) in {tally.chains} chain(s); {tally.no_store_yet} before "
          f"the first commit; {tally.finished_before_kill} run(s) finished before their kill; every store readable "
          f"and inspectable; {tally.reruns_identical} of {tally.chains} chains' final stores identical to the "
          f"uninterrupted run; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
