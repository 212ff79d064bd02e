"""Adapter save/load (filled in below)."""


def save_adapter(model, path, format="native", name=None):  # placeholder, replaced next
    raise NotImplementedError


def load_adapter(model, path, name=None):
    raise NotImplementedError
