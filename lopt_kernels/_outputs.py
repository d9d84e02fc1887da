"""Model outputs that declare LoPT's extra fields.

The patched causal LM returns its usual ``ModelOutput`` with ``task_loss`` and ``aux_loss`` added. A
``ModelOutput`` is a dataclass that transformers registers as a pytree node and rebuilds with
``type(output)(**items)`` (DDP with ``find_unused_parameters=True``, ``torch.compile``, FSDP): keys that
are not dataclass fields would make that rebuild fail. So the output is re-typed, once per output
class, to a subclass that declares the missing fields (``MoeCausalLMOutputWithPast`` already has
``aux_loss``; its meaning is then LoPT's reconstruction loss)."""

from __future__ import annotations

import dataclasses


LOPT_FIELDS = ("task_loss", "aux_loss")
_TYPES: dict[type, type] = {}


def output_type_for(cls: type) -> type:
    """``cls`` itself if it is no dataclass or already declares the fields; else a cached subclass that does."""
    new = _TYPES.get(cls)
    if new is None:
        if not dataclasses.is_dataclass(cls):
            new = cls
        else:
            have = {f.name for f in dataclasses.fields(cls)}
            missing = [name for name in LOPT_FIELDS if name not in have]
            if not missing:
                new = cls
            else:
                name = f"Lopt{cls.__name__}"
                new = dataclasses.make_dataclass(
                    name, [(f, "torch.Tensor | None", dataclasses.field(default=None)) for f in missing],
                    bases=(cls,), namespace={"__module__": __name__},
                )
                new.__qualname__ = f"{name}_{len(_TYPES)}"
                globals()[new.__qualname__] = new  # importable by name, so outputs stay picklable
        _TYPES[cls] = new
    return new


def with_lopt_fields(output):
    """``output`` re-typed (same items, same order) so that ``task_loss``/``aux_loss`` are fields."""
    new = output_type_for(type(output))
    if new is type(output):
        return output
    return new(**output)


__all__ = ["LOPT_FIELDS", "output_type_for", "with_lopt_fields"]
