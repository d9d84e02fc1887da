"""Model outputs that declare LoPT's extra fields.

The patched causal LM returns its usual ``ModelOutput`` with ``task_loss`` and ``lopt_aux_loss`` (LoPT's
reconstruction loss) added, and ``aux_loss`` holding that reconstruction loss too where the model's output
class has no ``aux_loss`` of its own (dense models). A
``ModelOutput`` is a dataclass that transformers registers as a pytree node and rebuilds with
``type(output)(**items)`` (DDP with ``find_unused_parameters=True``, ``torch.compile``, FSDP): keys that
are not dataclass fields would make that rebuild fail. So the output is re-typed, once per output
class, to a subclass that declares the missing fields. ``MoeCausalLMOutputWithPast`` already declares
``aux_loss``: there it stays the model's router load-balancing loss (what TRL and users read), and LoPT's
loss is only in ``lopt_aux_loss``."""

from __future__ import annotations

import dataclasses


LOPT_FIELDS = ("task_loss", "aux_loss", "lopt_aux_loss")
_TYPES: dict[type, type] = {}
_BASES: dict[type, type] = {}  # subclass made here -> the model's own output class


def declares_own_aux_loss(cls: type) -> bool:
    """Whether the model's own output class (before LoPT re-typed it) has an ``aux_loss`` field (MoE models)."""
    cls = _BASES.get(cls, cls)
    return dataclasses.is_dataclass(cls) and any(f.name == "aux_loss" for f in dataclasses.fields(cls))


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
                _BASES[new] = cls
        _TYPES[cls] = new
    return new


def with_lopt_fields(output):
    """``output`` re-typed (same items, same order) so that LoPT's fields are dataclass fields."""
    new = output_type_for(type(output))
    if new is type(output):
        return output
    return new(**output)


__all__ = ["LOPT_FIELDS", "declares_own_aux_loss", "output_type_for", "with_lopt_fields"]
