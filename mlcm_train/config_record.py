"""What every trainer config dataclass shares: JSON round trip, a recipe hash, checked choices."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar, TypeVar

# Fields marked with this metadata cannot change the trained weights; config_hash() ignores them.
BOOKKEEPING = {"bookkeeping": True}

C = TypeVar("C", bound="ConfigRecord")


class ConfigRecord:
    """Mixin for frozen config dataclasses (``DistillConfig``, ``RewardConfig``)."""

    _KIND: ClassVar[str] = "config"  # how errors name this kind of config
    _KNOWN_BY: ClassVar[str] = "this trainer"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of every field that can change the trained weights."""
        recipe = {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("bookkeeping")
        }
        payload = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls._KIND} keys {unknown}; {cls._KNOWN_BY} knows {sorted(names)}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming the allowed values when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
