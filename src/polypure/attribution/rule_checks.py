"""Rule checks: whether a config's composites and canonizers give sound relevance, before hours of compute.

For every variant (a name and a :class:`~polypure.attribution.relevance_plan.Rule`), a few samples and a few neurons of
each target, every (neuron, sample) pair is a row, and three things are measured, the problems zennit's
users report most among them:

* **canonizer gaps**: a canonizer rewrites the network for LRP and must not change what it computes. The
  model output and the output of every checked layer are compared with and without the variant's
  canonizers applied: the largest absolute difference, and that over the largest absolute value, which
  fails above :data:`CANONIZER_TOLERANCE`;
* **conservation** (LRP composites, AttnLRP included, whose gradient times the activation is the
  relevance): per row, the sum of the relevance at an attribution layer over the sum of the initial relevance at the target neuron (its
  activation clamped at 0); the median and the worst ratio (furthest from 1) per layer are shown, and a
  median above :data:`CONSERVATION_LIMIT` fails (relevance is being created), as does one whose size is
  below :data:`VANISHING` (relevance vanishes: 1e-27 on an EfficientNet whose gates and norms get the plain
  gradient) or that is negative (the relevance flips sign);
* **dead or exploding relevance**: the share of rows with all-zero relevance at a layer, which fails above
  :data:`ZERO_SHARE`, and the share with a non-finite value, which fails above 0.

A row whose neuron does not fire on its sample has zero initial relevance and so zero relevance at every
layer, by construction rather than by the rule (a dead neuron, or one that these samples do not excite).
Such rows are counted apart, as the target's ``silent`` share, and left out of the zero share and the
conservation ratios.

Biases and normalisation shifts absorb relevance by design, so a median of 0.3 may be the rule or a
canonizer gap. **Ideal mode** (``ideal=True``, ``polypure check-rules --ideal``) tells them apart: it checks
a copy of the model with every bias and every normalisation shift set to zero (:func:`ideal_model`), on
which a zennit LRP composite of epsilon, z+, gamma and box rules (``epsilon_plus``, ``epsilon_plus_flat``,
``epsilon_gamma_box``, ``excitation_backprop``) conserves relevance exactly up to its stabiliser, so every median
further than :data:`IDEAL_TOLERANCE` from 1 fails and points at a layer the canonizers leave to the plain
gradient. Alpha-beta rules (:data:`INEXACT_COMPOSITES`) conserve only where a neuron has contributions of both
signs: ``alpha2_beta1`` doubles the relevance of a neuron without negative ones (2.79 at ``block_4`` of
EfficientNet-Lite0, whose depthwise convolutions often have one sign), so in ideal mode their medians are shown,
with the verdict ``shown``, and only vanishing or sign-flipped relevance fails. The canonizers' output change
is shown there but judged on the model itself only.

Example
-------
>>> from polypure.config.settings import load_config
>>> from polypure.attribution.rule_checks import check_config
>>> cfg = load_config("demo", ["data.synthetic={n: 4, size: 32}", "relevance.composite=epsilon_plus", "device=cpu"])
>>> report = check_config(cfg, samples=4, neurons=2)
>>> report.passed, [check.layer for check in report.checks[:3]]
(True, ['output', 'logits', 'block_0'])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from copy import copy, deepcopy
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from polypure.attribution.canonizers import CANONIZER_TOLERANCE
from polypure.attribution.composites import CANONIZERS, GRADIENT_COMPOSITES, GRADIENT_LRP_COMPOSITES, warn_uncanonized
from polypure.attribution.hooks import probe_layers, tap_layers
from polypure.attribution.precision import resolve_device
from polypure.attribution.relevance_plan import Rule, TargetPlan, rules_from_config
from polypure.config.selection import check_count, select_neurons
from polypure.config.settings import Config
from polypure.models.factory import ExplainedModel
from polypure.pipeline.work_units import build_data, build_model

#: The largest median conservation ratio of a layer. zennit's rules do not conserve exactly: biases (large
#: once batch norms are merged into them), the epsilon stabiliser and the flat / box / alpha-beta rules
#: absorb relevance or flip its sign row by row, so the worst row of a standard composite is far from 1
#: (on the demo ResNet from -0.7 to 24) and the median lies between 0.05 and 1; the gamma rule's negative
#: biases create a little (median 1.47 at ``block_6`` of EfficientNet-Lite0 with real weights and photos).
#: A typical row with more relevance than that means relevance is being created by an operation left to the
#: plain gradient: one residual addition doubles it (2.0 at ``block_2`` of the demo without canonizers),
#: two or more compound, and a batch norm left unmerged multiplies it by its scale under zennit < 0.5.
CONSERVATION_LIMIT = 1.75

#: LRP composites that do not conserve relevance even without biases: alpha-beta, whose beta term has nothing to
#: take from a neuron whose contributions are all positive. Ideal mode shows their medians without judging them.
INEXACT_COMPOSITES = frozenset({"epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat"})

#: The smallest size of a layer's median conservation ratio: below it the relevance has vanished (an EfficientNet
#: whose squeeze-excitation gates and batch norms get the plain gradient ends at 1e-27).
VANISHING = 1e-3

#: In ideal mode (no biases, no normalisation shifts), how far from 1 a layer's median conservation ratio may
#: be. The epsilon rule's stabiliser and z+ outputs without a positive contribution lose a little; on the
#: test zoo of 16 canonized architectures the medians lie within 0.7% of 1.
IDEAL_TOLERANCE = 1e-2

#: The largest share of rows (among those whose neuron fired) that may have all-zero relevance at a layer.
ZERO_SHARE = 0.5

#: The model's own output, checked for canonizer changes next to the named layers.
OUTPUT = "output"


@dataclass
class LayerCheck:
    """The measurements of one layer for one variant and target: a row of the table.

    Attributes
    ----------
    variant : str
    target : str
        The target whose relevance is checked; empty for the model output.
    layer : str
        An attribution layer, the target layer itself, or ``output`` (the model output).
    canonizer_abs, canonizer_rel : float or None
        Largest absolute change of the layer's output that the variant's canonizers cause, and that over
        the largest absolute value of the output; None without canonizers.
    conservation_median, conservation_worst : float or None
        Median and worst (furthest from 1) ratio of relevance sums, layer over target; None where
        conservation does not apply (gradient-type composites, the target's own row, no fired rows).
    silent : float or None
        Target row only: share of rows whose neuron does not fire on the sample.
    zero : float or None
        Share of fired rows with all-zero relevance at the layer.
    non_finite : float or None
        Share of rows with a non-finite value (relevance, or for the target row the initial relevance).
    rows : int
        (neuron, sample) rows measured.
    failures : list of str
        One line per failed check, naming the variant and the layer.
    """

    variant: str
    target: str
    layer: str
    canonizer_abs: float | None = None
    canonizer_rel: float | None = None
    conservation_median: float | None = None
    conservation_worst: float | None = None
    silent: float | None = None
    zero: float | None = None
    non_finite: float | None = None
    rows: int = 0
    failures: list[str] = field(default_factory=list)
    judged: bool = True

    @property
    def passed(self) -> bool:
        """Whether every check of this row passed."""
        return not self.failures

    @property
    def verdict(self) -> str:
        """``FAIL``, ``ok``, or ``shown`` where the conservation ratio was measured but not judged."""
        if self.failures:
            return "FAIL"
        return "shown" if not self.judged and self.conservation_median is not None else "ok"


@dataclass
class RuleReport:
    """The result of :func:`check_rules`: one :class:`LayerCheck` per variant and layer."""

    checks: list[LayerCheck]

    @property
    def failures(self) -> list[str]:
        """Every failed check, one line each, in table order."""
        return [line for check in self.checks for line in check.failures]

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return not self.failures

    def table(self) -> str:
        """Format the checks as a table: one line per variant and layer, ``-`` where a measurement does not apply."""
        def sci(value):
            return "-" if value is None else f"{value:.1e}"

        def ratio(value):
            return "-" if value is None else f"{value:.3g}"

        def share(value):
            return "-" if value is None else f"{100 * value:.0f}%"

        header = ["variant", "target", "layer", "canon abs", "canon rel", "cons median", "cons worst", "silent",
                  "zero", "non-finite", "verdict"]
        lines = [[c.variant, c.target or "-", c.layer, sci(c.canonizer_abs), sci(c.canonizer_rel),
                  ratio(c.conservation_median), ratio(c.conservation_worst), share(c.silent), share(c.zero),
                  share(c.non_finite), c.verdict] for c in self.checks]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                          for row in [header, *lines])
        shown = sorted({c.variant for c in self.checks if c.verdict == "shown"})
        if shown:
            text += (f"\nshown: {', '.join(shown)} (alpha-beta) conserve only where a neuron has contributions of "
                     "both signs, so their ideal-mode ratios are not judged (only vanishing or sign flips fail)")
        return text


@contextmanager
def _exact_float32() -> Iterator[None]:
    # TF32 (on by default for cuDNN convolutions) keeps 10 bits of mantissa: its rounding, about 5e-4 relative,
    # differs between merged and unmerged weights and is as large as the tolerance
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _outputs(module: nn.Module, images: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    with torch.no_grad(), tap_layers(layers, stop=False) as taps:
        out = module(images)
        outputs = dict(taps)
    if isinstance(out, torch.Tensor):
        outputs[OUTPUT] = out
    return outputs


def canonizer_change(module: nn.Module, canonizers: Sequence[str], images: torch.Tensor,
                     layers: dict[str, nn.Module]) -> dict[str, tuple[float, float]]:
    """How much applying canonizers changes the model output and the outputs of some layers.

    The canonizers are applied with zennit's ``Canonizer.apply`` and removed again (also on an error), so
    the module is unchanged afterwards.

    Parameters
    ----------
    module : torch.nn.Module
        The network, in eval mode.
    canonizers : sequence of str
        Registered canonizer names (:data:`polypure.attribution.composites.CANONIZERS`).
    images : Tensor
        Model inputs, on the module's device.
    layers : dict of str to Module
        Layers whose outputs are compared too.

    Returns
    -------
    dict of str to (float, float)
        Per layer name, and ``output`` for the model output where it is a tensor: the largest absolute
        difference and that over the largest absolute value without canonizers (0 when both are 0).
    """
    with _exact_float32():
        before = _outputs(module, images, layers)
        instances = []
        try:
            for name in canonizers:
                instances += CANONIZERS.get(name)().apply(module)
            after = _outputs(module, images, layers)
        finally:
            # undone last first, as one canonizer may change what another one changed
            for instance in reversed(instances):
                instance.remove()
    change = {}
    for name, reference in before.items():
        difference = float((after[name].float() - reference.float()).abs().max())
        scale = float(reference.float().abs().max())
        change[name] = difference, (difference / scale if scale > 0 else 0.0 if difference == 0 else math.inf)
    return change


class _ModelState:
    """Every module's attributes (parameters, buffers, children, hooks) and tensors, to compare and restore.

    zennit undoes a composite's canonizers in the order it applied them; two canonizers that change the same
    module (``resnet`` and ``merge_bn`` both merge the first batch norm) are then not undone, or the undoing
    fails half-way. The check must leave the model as it found it even then, and say so.
    """

    def __init__(self, module: nn.Module):
        self.modules = list(module.named_modules())
        self.attributes = [self._attributes(m) for _, m in self.modules]
        self.values = [{key: (t.detach().clone(), t.requires_grad) for key, t in self._tensors(m)}
                       for _, m in self.modules]

    @staticmethod
    def _attributes(module: nn.Module) -> dict:
        # the dictionaries a module keeps its parameters, buffers, children and hooks in are copied, so that
        # what is added to them later does not show here
        return {key: copy(value) if isinstance(value, dict) else value for key, value in vars(module).items()}

    @staticmethod
    def _tensors(module: nn.Module):
        return [(key, t) for key, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]

    def changed(self) -> list[str]:
        """Name the modules whose attributes or tensor values differ from the snapshot."""
        out = []
        for (name, module), attributes, values in zip(self.modules, self.attributes, self.values, strict=True):
            now = self._attributes(module)
            same = now.keys() == attributes.keys() and all(
                now[key].keys() == value.keys() and all(now[key][k] is v for k, v in value.items())
                if isinstance(value, dict) else now[key] is value
                for key, value in attributes.items())
            tensors = dict(self._tensors(module))
            if not (same and tensors.keys() == values.keys()
                    and all(torch.equal(tensors[key], value) and tensors[key].requires_grad is grad
                            for key, (value, grad) in values.items())):
                out.append(name or "(the model)")
        return out

    def restore(self) -> None:
        """Put back every module's attributes and tensor values."""
        for (_, module), attributes, values in zip(self.modules, self.attributes, self.values, strict=True):
            vars(module).clear()
            vars(module).update({key: copy(value) if isinstance(value, dict) else value
                                 for key, value in attributes.items()})
            for key, t in self._tensors(module):
                value, grad = values[key]
                t.data = value.clone()
                t.requires_grad_(grad)


def _worst(ratios: np.ndarray) -> float:
    # furthest from 1 on a log scale (0.1 is as bad as 10); zero or negative ratios are the furthest
    distance = np.where(ratios > 0, np.abs(np.log(np.where(ratios > 0, ratios, 1.0))), np.inf)
    return float(ratios[int(np.argmax(distance))])


def ideal_model(model: ExplainedModel) -> ExplainedModel:
    """A copy of the model with every bias and every normalisation shift set to zero.

    Biases of convolutions, linear and norm layers become zero, and batch norms' running means too, so that
    a batch norm scales without shifting; layer norms keep subtracting their mean, a statistic that the
    identity rule treats as a constant. What remains is a network on which LRP's conserving rules conserve
    exactly.

    Parameters
    ----------
    model : ExplainedModel

    Returns
    -------
    ExplainedModel
        The same aliases and settings around a deep copy of the module.
    """
    module = deepcopy(model.module)
    with torch.no_grad():
        for child in module.modules():
            bias = child._parameters.get("bias")
            if bias is not None:
                bias.zero_()
            mean = child._buffers.get("running_mean")
            if mean is not None:
                mean.zero_()
    return replace(model, module=module)


def _relevance_rows(model: ExplainedModel, rule: Rule, plan: TargetPlan, images: torch.Tensor,
                    batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], Exception | None]:
    """Compute per row (neuron, sample) the initial relevance sum, and per layer the relevance sum and flags.

    The layers' values are (R, 3) tensors: the sum, all zero (1 or 0), all finite (1 or 0). The third value
    is the error that removing the engine's composite and canonizers raised, if any: the relevance was
    computed all the same.
    """
    n = len(images)
    per_batch = max(1, batch_size // n)
    starts, maps = [], {}
    engine = rule.engine(model, plan)
    with ExitStack() as computing:
        # an error of the computation leaves the engine here and propagates; after a computation that worked,
        # the engine is left below, where an error of undoing its canonizers is kept as a finding
        computing.enter_context(engine)
        for first in range(0, len(plan.neurons), per_batch):
            neurons = torch.as_tensor(plan.neurons[first:first + per_batch]).repeat_interleave(n)
            make = plan.make_init(neurons)

            def init(target, make=make):
                # the relevance the backward pass starts from, summed per row, for the conservation ratio
                start = make(target)
                starts.append(start.flatten(1).sum(1).detach().double().cpu())
                return start

            out = engine(images, torch.arange(n).repeat(len(neurons) // n), init,
                         keep_maps=tuple(plan.attribution_layers))
            for name, value in out.maps.items():
                # per row: the relevance sum, whether it is all zero, whether it is all finite
                flat = value.flatten(1)
                maps.setdefault(name, []).append(torch.stack([flat.double().sum(1), (flat == 0).all(1).double(),
                                                              torch.isfinite(flat).all(1).double()], 1).cpu())
        computing.pop_all()
    try:
        engine.__exit__(None, None, None)
    except Exception as exc:  # zennit failing to undo canonizers is a finding of the check, not a crash
        undone = exc
    else:
        undone = None
    return torch.cat(starts), {name: torch.cat(values) for name, values in maps.items()}, undone


def _conservation_failure(median: float, conservation: float, ideal: bool) -> str | None:
    """What is wrong with a layer's median conservation ratio, or None."""
    if abs(median) < VANISHING:
        return (f"the median row has {median:.3g} times the target's relevance (at least {VANISHING:g} in size): "
                "relevance vanishes")
    if median < 0:
        return f"the median row has {median:.3g} times the target's relevance: relevance flips sign"
    if median > conservation:
        return (f"the median row has {median:.3g} times the target's relevance (at most {conservation:g}): "
                "relevance is created")
    if ideal and abs(median - 1) > IDEAL_TOLERANCE:
        return (f"the median row has {median:.3g} times the target's relevance, but without biases and "
                f"normalisation shifts the rule conserves it (within {IDEAL_TOLERANCE:g} of 1): a canonizer gap "
                "between this layer and the target")
    return None


def _check_target(variant: str, model: ExplainedModel, rule: Rule, plan: TargetPlan, images: torch.Tensor,
                  change: dict[str, tuple[float, float]], *, batch_size: int, conservation: float,
                  zero_share: float, ideal: bool = False) -> tuple[list[LayerCheck], Exception | None]:
    start, maps, undone = _relevance_rows(model, rule, plan, images, batch_size)
    finite_start = torch.isfinite(start)
    fired = finite_start & (start != 0)
    # LRP conserves relevance, whether the backward signal is the relevance or, in the gradient x input
    # framework (AttnLRP), a gradient that times the activation is the relevance
    conserves = (rule.composite not in GRADIENT_COMPOSITES and not rule.times_activation) or \
        (rule.composite in GRADIENT_LRP_COMPOSITES and rule.times_activation)
    where = f"variant {variant!r}, target {plan.name!r}"
    target = LayerCheck(variant, plan.name, plan.layer, *change.get(plan.layer, (None, None)),
                        silent=float((finite_start & (start == 0)).double().mean()),
                        non_finite=float((~finite_start).double().mean()), rows=len(start))
    if target.non_finite:
        target.failures.append(f"{where}, layer {plan.layer!r}: non-finite initial relevance in "
                               f"{int((~finite_start).sum())} of {len(start)} rows")
    checks = [target]
    for layer in plan.attribution_layers:
        sums, zero, finite = maps[layer].unbind(1)
        zero, finite = zero.bool(), finite.bool()
        check = LayerCheck(variant, plan.name, layer, *change.get(layer, (None, None)),
                           zero=float(zero[fired].double().mean()) if fired.any() else None,
                           non_finite=float((~finite).double().mean()), rows=len(sums))
        at = f"{where}, layer {layer!r}"
        if not finite.all():
            check.failures.append(f"{at}: non-finite relevance in {int((~finite).sum())} of {len(sums)} rows")
        if check.zero is not None and check.zero > zero_share:
            check.failures.append(f"{at}: all-zero relevance in {check.zero:.0%} of the rows whose neuron fired "
                                  f"(at most {zero_share:.0%})")
        usable = fired & finite
        if conserves and usable.any():
            ratios = (sums[usable] / start[usable]).numpy()
            check.conservation_median, check.conservation_worst = float(np.median(ratios)), _worst(ratios)
            # exact conservation is the zennit rules' promise on the ideal model, not AttnLRP's nor alpha-beta's
            check.judged = not (ideal and rule.composite in INEXACT_COMPOSITES)
            failure = _conservation_failure(check.conservation_median, conservation if check.judged else math.inf,
                                            ideal and rule.composite not in GRADIENT_COMPOSITES | INEXACT_COMPOSITES)
            # relevance that is all zero in most rows has vanished, and the zero share says so already
            if failure is not None and not check.failures:
                check.failures.append(f"{at}: {failure}")
        checks.append(check)
    return checks, undone


def _check_variant(variant: str, rule: Rule, model: ExplainedModel, images: torch.Tensor,
                   targets: Sequence[TargetPlan], state: _ModelState, *, batch_size: int, canonizer_tolerance: float,
                   conservation: float, zero_share: float, layers: dict[str, nn.Module],
                   ideal: bool = False) -> list[LayerCheck]:
    change = canonizer_change(model.module, rule.canonizers, images, layers) if rule.canonizers else {}
    output = LayerCheck(variant, "", OUTPUT, *change.get(OUTPUT, (None, None)))
    checks = [output]
    for plan in targets:
        target_checks, undone = _check_target(variant, model, rule, plan, images, change, batch_size=batch_size,
                                              conservation=conservation, zero_share=zero_share, ideal=ideal)
        checks += target_checks
        left = state.changed()
        if undone is not None or left:
            state.restore()
            undoing = f"its composite and canonizers {', '.join(rule.canonizers)}" if rule.canonizers else \
                "its composite"
            failed = f"fails ({type(undone).__name__}: {undone})" if undone is not None else "is incomplete"
            message = (f"variant {variant!r}: undoing {undoing} {failed}, module(s) {', '.join(left) or 'none'} "
                       "left changed (zennit undoes canonizers in the order it applied them: two that change the "
                       "same module are not undone)")
            if message not in output.failures:
                output.failures.append(message)
    named = set()
    for check in checks:
        # a layer shared by several targets is named once; on the ideal model, whose unshifted norms let
        # activations and rounding grow, the change is shown but judged on the model itself only
        if check.canonizer_rel is not None and check.canonizer_rel > canonizer_tolerance and \
                check.layer not in named and not ideal:
            named.add(check.layer)
            check.failures.insert(0, f"variant {variant!r}, layer {check.layer!r}: canonizers "
                                     f"{', '.join(rule.canonizers)} change its output by {check.canonizer_abs:.3g} "
                                     f"({check.canonizer_rel:.3g} of its largest value; at most "
                                     f"{canonizer_tolerance:g})")
    return checks


def check_rules(model: ExplainedModel, images: torch.Tensor, variants: Sequence[tuple[str, Rule]],
                targets: Sequence[TargetPlan], *, batch_size: int = 64,
                canonizer_tolerance: float = CANONIZER_TOLERANCE,
                conservation: float = CONSERVATION_LIMIT,
                zero_share: float = ZERO_SHARE, ideal: bool = False) -> RuleReport:
    """Check each variant's composite and canonizers on some samples.

    Parameters
    ----------
    model : ExplainedModel
        The network, in eval mode; it is unchanged afterwards (canonizers and hooks removed).
    images : Tensor, shape (N, C, H, W)
        The samples, on the model's device.
    variants : sequence of (str, Rule)
        Variant ids and their rules.
    targets : sequence of TargetPlan
        Target layers, the neurons to check and their attribution layers; every (neuron, sample) pair is a
        row.
    batch_size : int
        Rows per backward pass (at least one neuron's samples).
    canonizer_tolerance : float
        Largest relative output change canonizers may cause (:data:`CANONIZER_TOLERANCE`).
    conservation : float
        Largest median conservation ratio of a layer (:data:`CONSERVATION_LIMIT`); LRP composites only.
    zero_share : float
        Largest share of fired rows with all-zero relevance (:data:`ZERO_SHARE`).
    ideal : bool
        Check :func:`ideal_model` instead, a copy without biases and normalisation shifts, on which a zennit
        LRP composite must conserve relevance to within :data:`IDEAL_TOLERANCE`.

    Returns
    -------
    RuleReport
        Per variant, the model output's row, then per target the target layer's row and one row per
        attribution layer.
    """
    if ideal:
        model = ideal_model(model)
    layers = {name: model.submodule(name) for plan in targets for name in [plan.layer, *plan.attribution_layers]}
    checks = []
    for variant, rule in variants:
        if rule.composite not in GRADIENT_COMPOSITES:
            warn_uncanonized(model.module, rule.composite, list(rule.canonizers), sample=images[:1])
        state = _ModelState(model.module)
        try:
            checks += _check_variant(variant, rule, model, images, targets, state, batch_size=batch_size,
                                     canonizer_tolerance=canonizer_tolerance, conservation=conservation,
                                     zero_share=zero_share, layers=layers, ideal=ideal)
        except BaseException:
            state.restore()
            raise
    return RuleReport(checks)


#: Samples and neurons per target :func:`check_config` takes when not told (all of them where there are fewer).
DEFAULT_SAMPLES, DEFAULT_NEURONS = 8, 4


def config_targets(config: Config, model: ExplainedModel, sample: torch.Tensor,
                   neurons: int | None = None) -> list[TargetPlan]:
    """Plan the config's real targets with the first ``neurons`` of each target's selected neurons.

    Parameters
    ----------
    config : Config
    model : ExplainedModel
    sample : Tensor
        One model input (a batch of one), to learn each target layer's channels.
    neurons : int, optional
        Neurons per target: at least 1 and at most the largest target's selection (a target with fewer
        gives all of its own); default :data:`DEFAULT_NEURONS`, or fewer where no target has as many.

    Returns
    -------
    list of TargetPlan

    Raises
    ------
    ConfigError
        For a selection out of its layer's range, or ``neurons`` out of range (named ``--neurons``).
    """
    specs = config.relevance.target_list
    shapes, _ = probe_layers(model.module, {spec.layer: model.submodule(spec.layer) for spec in specs}, sample)
    short = config.relevance.targets is None
    selected = [select_neurons(spec.neurons, shapes[spec.layer][0],
                               "relevance.neurons" if short else f"relevance.targets[{i}].neurons")
                for i, spec in enumerate(specs)]
    largest = max((len(ids) for ids in selected), default=0)
    if neurons is None:
        neurons = min(DEFAULT_NEURONS, largest)
    elif largest:
        check_count(neurons, largest, "--neurons", "selected neurons of the largest target")
    return [TargetPlan(spec.layer, spec.layer, ids[:neurons], list(spec.attribution_layers))
            for spec, ids in zip(specs, selected)]


def check_config(config: Config, samples: int | None = None, neurons: int | None = None,
                 ideal: bool = False) -> RuleReport:
    """Check every rule variant a config describes on its model and the first samples of its data.

    The variants of ``relevance.variants``, or the one rule ``relevance.composite`` / ``canonizers`` /
    ``times_activation`` describe, checked as the variant ``default``.

    Parameters
    ----------
    config : Config
    samples : int, optional
        The first this many samples of the data: at least 1 and at most all of them (named ``--samples``
        when refused); default :data:`DEFAULT_SAMPLES`, or all where there are fewer.
    neurons : int, optional
        The first this many selected neurons of each target (planted targets are not checked); see
        :func:`config_targets`.
    ideal : bool
        Check the model without biases and normalisation shifts (:func:`check_rules`).

    Returns
    -------
    RuleReport

    Raises
    ------
    ConfigError
        For a bad model, data, composite, canonizer or layer in the config.
    """
    device = resolve_device(config.device)
    model = build_model(config, device)
    return check_model(config, model, build_data(config, model), samples, neurons, ideal)


def check_model(config: Config, model: ExplainedModel, dataset, samples: int | None = None,
                neurons: int | None = None, ideal: bool = False) -> RuleReport:
    """:func:`check_config` for a model and data already built (an in-memory network, an ``Experiment``'s).

    Parameters
    ----------
    config : Config
        Its relevance section gives the rule variants and targets.
    model : ExplainedModel
        The network, on the device the check runs on.
    dataset : PolypureDataset
        Its first ``samples`` items are the images.
    samples, neurons, ideal
        As for :func:`check_config`.

    Returns
    -------
    RuleReport
    """
    device = next(iter(model.module.parameters()), torch.empty(0)).device
    if samples is None:
        samples = min(DEFAULT_SAMPLES, len(dataset))
    else:
        check_count(samples, len(dataset), "--samples", "samples of the data")
    images = torch.stack([dataset[i][0] for i in range(samples)]).to(device)
    rules = rules_from_config(config, model, dataset)
    targets = config_targets(config, model, images[:1], neurons)
    return check_rules(model, images, list(rules.items()), targets, batch_size=config.relevance.rows_per_pass,
                       ideal=ideal)
