"""One registry per extensible thing (scorers, strategies): a name -> the registered class's instance."""

from __future__ import annotations

from typing import Any

from surgery.errors import SurgeryError


class Registry(dict):
    """Filled by the `register` class decorator; `pick` looks a name up with a one-line error."""

    def __init__(self, kind: str, choose: str = "one of") -> None:
        super().__init__()
        self.kind, self.choose = kind, choose

    def register(self, cls: type) -> type:
        self[cls.name] = cls()
        return cls

    def pick(self, name: str) -> Any:
        if name not in self:
            raise SurgeryError(f"unknown {self.kind} '{name}': use {self.choose} {', '.join(self)}")
        return self[name]
