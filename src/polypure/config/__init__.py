"""The run configuration: :mod:`~polypure.config.settings` validates a YAML file and its overrides."""
