"""Exceptions that carry a message meant for the user.

Every error a user can cause (a bad config, a missing file, an unknown name, a store made by another
config) is raised as one of these, with a one-line message that names the file, key, layer or neuron
involved. The command line prints the message without a traceback.
"""


class PolypureError(Exception):
    """A runtime failure with a message for the user (command-line exit status 1)."""


class ConfigError(PolypureError, ValueError):
    """A usage or configuration problem (command-line exit status 2).

    Also a ``ValueError``, so that code catching bad values from Python catches it too.
    """


class StoreError(PolypureError):
    """A store that cannot be read or does not fit the current run."""


class StaleResultError(StoreError, ConfigError):
    """A store holds a result made with other settings than the config asks for (exit status 2).

    Finished work is never replaced silently: the run stops and names the result and the setting that
    differs; ``--overwrite`` recomputes that result and what depends on it, nothing else.
    """
