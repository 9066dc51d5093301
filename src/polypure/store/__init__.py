"""The HDF5 store, the one place where results live.

- :mod:`~polypure.store.schema`: the layout, the one owner of every path and attribute name and the format version;
- :mod:`~polypure.store.hdf5_store`: :class:`~polypure.store.hdf5_store.Store`, its accessors and guarded writes;
- :mod:`~polypure.store.growth`: how a store grows with its config (more neurons, variants) and when it is stale;
- :mod:`~polypure.store.write_session`: the one writer's lock, working copy and atomic commits;
- :mod:`~polypure.store.results`: read-only results as pandas DataFrames for notebooks;
- :mod:`~polypure.store.inspection`: the readable summary that ``polypure inspect`` prints.
"""
