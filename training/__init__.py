"""Training CLI of RepServe: RepAdapter (and linear-probe / full fine-tuning baselines) on a frozen backbone.

``python -m training --help``. Builds on :mod:`repadapter` only; the result is a task bundle in the store.
"""
