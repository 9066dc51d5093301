"""The HDF5 store, the one place where results live.

- :mod:`~polypure.store.hdf5_store`: :class:`~polypure.store.hdf5_store.Store`, its schema and accessors;
- :mod:`~polypure.store.write_session`: the one writer's lock, working copy and atomic commits;
- :mod:`~polypure.store.results`: read-only results as pandas DataFrames for notebooks;
- :mod:`~polypure.store.inspection`: the readable summary that ``polypure inspect`` prints.
"""
