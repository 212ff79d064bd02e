"""Moved to :mod:`loravariants.compare.plots`; this old path keeps importing its public names."""

from .compare.plots import layer_of, make_report_plots, smooth  # noqa: F401
