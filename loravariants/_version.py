"""The library version, in a module of its own: everything that records it (saved adapters,
results, the built-in base's build info) imports it from here, not from the package."""

__version__ = "0.1.0"
