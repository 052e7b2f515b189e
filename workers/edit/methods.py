"""The edit methods by their recipe name (``edit_method``): the one place the engine looks
a method up. A new method is a module implementing ``workers.edit.update.EditMethod``, one
entry here, and its name in ``schemas.edit_recipe.EditMethod``."""

from __future__ import annotations

from workers.edit.alphaedit import AlphaEdit
from workers.edit.memit import Memit
from workers.edit.rome import Rome
from workers.edit.update import EditMethod

# typed: mypy checks each against the protocol
_ALL: tuple[EditMethod, ...] = (Rome(), Memit(), AlphaEdit())
METHODS: dict[str, EditMethod] = {m.name: m for m in _ALL}


def edit_method(name: str) -> EditMethod:
    """The method of ``edit_method: name`` (the recipe schema admits only these names)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown edit method {name!r}; known: {', '.join(METHODS)}") from None
