"""Robust linear heads on cached features, each one :class:`~..linear_head.LinearHead` subclass."""
