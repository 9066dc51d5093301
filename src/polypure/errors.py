"""Exceptions that carry a message meant for the user.

Every error a user can cause (a bad config, a missing file, an unknown name, a store made by another
config) is raised as one of these, with a one-line message that names the file, key, layer or neuron
involved. The command line prints the message without a traceback.

Exit status of the command line: :class:`InputError` and everything under it (:class:`ConfigError`,
:class:`StoreError`) is bad input, status 2; any other :class:`PolypureError` is a runtime failure,
status 1.
"""


class PolypureError(Exception):
    """A runtime failure with a message for the user (command-line exit status 1)."""


class InputError(PolypureError):
    """Bad input: a config, file, store, model or plugin that cannot be used as given (exit status 2).

    The base of :class:`ConfigError` and :class:`StoreError`; raised itself for input that is no config
    key and no store, such as a clusterer or evaluator plugin that fails on the data it is given.
    """


class ConfigError(InputError, ValueError):
    """A usage or configuration problem (command-line exit status 2).

    Also a ``ValueError``, so that code catching bad values from Python catches it too.
    """


class StoreError(InputError):
    """A store that cannot be read or does not fit the current run (exit status 2)."""


class StaleResultError(StoreError, ConfigError):
    """A store holds a result made with other settings than the config asks for (exit status 2).

    Finished work is never replaced silently: the run stops and names the result and the setting that
    differs; ``--overwrite`` recomputes that result and what depends on it, nothing else.
    """


class StoreLockedError(StoreError, ConfigError):
    """Another process is writing the store (command-line exit status 2)."""


class DiskFullError(PolypureError):
    """The store's file system ran out of space; everything committed before is kept (exit status 1)."""


class ClustererFailed(InputError):
    """A clusterer raised on the data, or returned labels of the wrong shape (exit status 2).

    Clusterings finished before stay in the store.
    """


class StopForward(Exception):  
    """Raised inside a hook to end a forward pass once every needed layer has run.

    Control flow, not an error: :func:`polypure.attribution.hooks.tap_layers` raises it and
    :func:`polypure.attribution.hooks.forward_to` catches it; it never reaches a user.
    """
