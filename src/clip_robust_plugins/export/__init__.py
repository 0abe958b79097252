"""``export_wds``: any registered dataset written as WebDataset shards with our ``groups.json``.

``shards`` writes the shards (a library call, :func:`~.shards.run_export`); ``command``
registers the command through the same hook a third-party plugin uses.
"""
