"""What ``relevance_speed.py --cli`` runs in fresh processes: the per-pair floor, and the command line with timers.

Only the standard library is imported at the top, so that a process's imports are what it measures.

``python fresh_process.py floor JOB.json`` is the floor as a program of its own would run it: import
PyTorch and torchvision, keep freed memory as every polypure process does (:mod:`polypure.allocator`), build
ResNet-34, decode the referenced images from their files (PIL, normalised as
polypure's data does), then one :func:`resnet_floor` over every (neuron, reference) row. With ``"extra":
true`` in the job it then repeats the floor (warm kernels) and runs it at the other batch sizes of
``"batches"``. It prints one JSON line of seconds: ``imports``, ``build``, ``decode``, ``cold`` (the first
floor, which pays oneDNN's building of kernels for every new shape), and with ``extra`` ``warm`` and
``batches``.

``python fresh_process.py cli ARGS...`` runs ``polypure ARGS...`` in this process with timers around its
parts and prints one JSON line: ``imports`` (of ``polypure.cli``), ``build_model``, ``build_dataset``,
``validate`` (which builds both), ``session_open`` (the store's working copy), ``stage`` (the relevance
stage's ``run``), ``compute`` (:func:`polypure.attribution.relevance_plan.compute_target`), ``passes`` (each
pass of the engine), ``commits`` (each commit of the store), ``main`` (the command, from parsing its
arguments to its end).
"""

from __future__ import annotations

import functools
import json
import sys
import time

START = time.perf_counter()


def resnet_floor(net, images, refs, neurons, batch, target, depth):
    """The per-pair floor on a torchvision-style ResNet.

    Per batch of (neuron, reference) rows a bare forward from the input to ``target`` (``block_3`` or
    ``logits``), cut at block_0, and one autograd.grad to the first ``depth`` blocks; no hooks, no
    bookkeeping, no sharing. ``images`` is indexed by sample index.
    """
    import numpy as np
    import torch

    rows = torch.as_tensor(refs.reshape(-1))
    row_neurons = torch.as_tensor(np.repeat(neurons, refs.shape[1]))
    for start in range(0, len(rows), batch):
        x = images[rows[start:start + batch]]
        k = row_neurons[start:start + batch]
        with torch.no_grad():
            h = net.relu(net.bn1(net.conv1(x)))
            h = net.maxpool(h) if hasattr(net, "maxpool") else h
        blocks = [net.layer1(h).requires_grad_(True)]
        for layer in (net.layer2, net.layer3, net.layer4):
            blocks.append(layer(blocks[-1]))
        out = blocks[-1] if target == "block_3" else net.fc(torch.flatten(net.avgpool(blocks[-1]), 1))
        grad = torch.zeros_like(out)
        index = torch.arange(len(x))
        grad[index, k] = out.detach()[index, k].clamp(min=0)
        torch.autograd.grad(out, blocks[:depth], grad)


def floor(job_path: str) -> dict:
    """The floor of a job file (see the module's docstring), timed part by part."""
    job = json.loads(open(job_path).read())
    out = {}
    # the allocator setting every polypure process has (polypure.allocator): the ratio is then polypure's work against
    # the bare computation, not glibc's defaults against polypure's
    from polypure.allocator import keep_freed_memory
    keep_freed_memory()
    t = time.perf_counter()
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    out["imports"] = time.perf_counter() - START

    t = time.perf_counter()
    torch.manual_seed(job["seed"])
    net = torchvision.models.resnet34().eval().requires_grad_(False)
    out["build"] = time.perf_counter() - t

    t = time.perf_counter()
    refs = np.asarray(job["refs"], np.int64)
    mean = torch.tensor(job["mean"]).view(-1, 1, 1)
    std = torch.tensor(job["std"]).view(-1, 1, 1)
    images = torch.zeros((len(job["files"]), 3, job["size"], job["size"]))
    for i in np.unique(refs):
        with Image.open(job["files"][i]) as img:
            pixels = torch.as_tensor(np.asarray(img.convert("RGB"))).permute(2, 0, 1).float().div_(255)
        images[i] = (pixels - mean) / std
    out["decode"] = time.perf_counter() - t

    def timed(batch):
        t = time.perf_counter()
        resnet_floor(net, images, refs, job["neurons"], batch, "block_3", 3)
        return time.perf_counter() - t

    out["cold"] = timed(job["batch"])
    if job.get("extra"):
        out["warm"] = timed(job["batch"])
        out["batches"] = {str(b): timed(b) for b in job["batches"]}
    return out


def cli(argv: list[str]) -> dict:
    """``polypure ARGV`` in this process, timed part by part (see the module's docstring)."""
    import polypure.cli as command
    timers: dict[str, list[float]] = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.setdefault(label, []).append(time.perf_counter() - t)

        setattr(owner, name, timed)

    import polypure.attribution.engine as engine
    import polypure.attribution.relevance_plan as relevance_plan
    import polypure.experiment as experiment
    import polypure.pipeline.preflight as preflight
    import polypure.pipeline.relevance_stage as relevance_stage
    import polypure.store.write_session as write_session
    out = {"imports": time.perf_counter() - START}  # modules the command imports anyway
    # each the name its caller looks up at call time
    wrap(experiment, "build_model", "build_model")
    wrap(experiment, "build_dataset", "build_dataset")
    wrap(preflight, "check_experiment", "validate")
    wrap(write_session.WriteSession, "open", "session_open")
    wrap(write_session.WriteSession, "commit", "commits")
    wrap(relevance_plan, "compute_target", "compute")
    wrap(engine.ConditionalRelevance, "explain", "passes")
    wrap(relevance_stage, "run", "stage")
    t = time.perf_counter()
    status = command.main(argv)
    out["main"] = time.perf_counter() - t
    if status:
        raise SystemExit(status)
    out.update(timers)
    return out


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    result = floor(rest[0]) if mode == "floor" else cli(rest)
    print(json.dumps(result))
