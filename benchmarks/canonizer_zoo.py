"""The canonizer zoo as a table: canonizers, ideal-mode conservation, output change, per architecture.

Per architecture: the canonizers chosen, epsilon_plus's ideal-mode conservation median at every stage, the
largest canonizer output change, and the uncanonized copy's verdict.

The architectures, their random weights and their calibrated batch norms are those of
``tests/test_canonizers.py`` (which asserts what this prints). Run from the repository root::

    python benchmarks/canonizer_zoo.py            # all 18; --only tv_resnet18 tv_densenet121 for some
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_canonizers import ZENNIT_MERGE_TOLERANCE, ZOO, randomise  # noqa: E402

from polypure.attribution.canonizers import CANONIZER_TOLERANCE, choose_canonizers  # noqa: E402
from polypure.attribution.relevance_plan import Rule, TargetPlan  # noqa: E402
from polypure.attribution.rule_checks import check_rules  # noqa: E402
from polypure.models.factory import ExplainedModel  # noqa: E402


def row(name: str) -> str:
    build, size, stages, _ = ZOO[name]
    torch.manual_seed(0)
    module = randomise(build(), size)
    model = ExplainedModel(module, layers={f"s{i}": path for i, path in enumerate(stages)})
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    aliases = list(model.layers)
    target = model.submodule(aliases[-1])
    outputs = []
    handle = target.register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        module(images)
    handle.remove()
    neuron = int(outputs[0].clamp(min=0).flatten(2).sum((0, 2)).argmax())
    plan = TargetPlan(aliases[-1], aliases[-1], torch.tensor([neuron]).numpy(), aliases[:-1])
    canonizers = choose_canonizers(module)
    variants = [("canonized", Rule("epsilon_plus", tuple(canonizers), False)), ("bare", Rule("epsilon_plus", (), False))]
    ideal = check_rules(model, images, variants, [plan], ideal=True)
    medians = [c.conservation_median for c in ideal.checks
               if c.variant == "canonized" and c.conservation_median is not None]
    bare = "fails" if any("'bare'" in f for f in ideal.failures) else "conserves"
    tolerance = ZENNIT_MERGE_TOLERANCE if "resnet" in canonizers else CANONIZER_TOLERANCE
    real = check_rules(model, images, variants[:1], [plan], conservation=1.05, canonizer_tolerance=tolerance)
    change = max(c.canonizer_rel for c in real.checks if c.canonizer_rel is not None)
    created = max(c.conservation_median for c in real.checks if c.conservation_median is not None)
    verdict = "ok" if ideal.passed or all("'bare'" in f for f in ideal.failures) else "FAIL"
    verdict = verdict if real.passed else "FAIL"
    stages_text = " ".join(f"{m:.4f}" for m in medians)
    return (f"| {name} | {', '.join(canonizers)} | {stages_text} | {change:.1e} | {created:.3f} | {bare} | "
            f"{verdict} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(ZOO), choices=list(ZOO), metavar="NAME")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| architecture | canonizers chosen | ideal median, stage by stage (epsilon_plus) | largest output change "
          "(of max) | largest median with biases | uncanonized, ideal | verdict |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
