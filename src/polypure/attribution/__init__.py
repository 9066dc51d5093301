"""Attribution: what a neuron responds to and which lower neurons its response comes from.

The engines that read a model, none of which touches the store:

- :mod:`~polypure.attribution.hooks`: forward hooks that record, rewrite and stop at layers;
- :mod:`~polypure.attribution.topk`: each channel's top-K reference samples;
- :mod:`~polypure.attribution.planted`: virtual neurons made of two real channels, with a known split;
- :mod:`~polypure.attribution.engine`: conditional relevance of lower layers, many pairs per backward pass;
- :mod:`~polypure.attribution.sharing`: which pairs share a forward pass of their image;
- :mod:`~polypure.attribution.composites`: attribution rules by name (zennit composites and canonizers);
- :mod:`~polypure.attribution.transformer_rules`: AttnLRP for vision transformers;
- :mod:`~polypure.attribution.precision`: numeric precision, devices and batch sizes;
- :mod:`~polypure.attribution.relevance_plan`: which targets, neurons and rules, computed chunk by chunk;
- :mod:`~polypure.attribution.crops`: PURE's crop view of a reference;
- :mod:`~polypure.attribution.rule_checks`: whether a rule conserves relevance, before hours of compute.
"""
