"""The library's error type, in a module that imports nothing else from the package (every layer may raise it)."""


class LoptPatchError(ValueError):
    """A model or an option that ``patch``/``unpatch`` cannot accept; the model is left untouched."""
