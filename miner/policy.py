"""Which callers the miner serves, and in what order. Pure functions of a hotkey and the metagraph view: they never
raise, so the Axon never turns a refusal into a 500."""
from __future__ import annotations

from dataclasses import dataclass

from miner.metagraph import MetagraphView


@dataclass(frozen=True)
class AccessPolicy:
    force_validator_permit: bool = True
    min_stake: float = 1.0
    allow: frozenset[str] = frozenset()  # served without the registration, permit and stake checks
    deny: frozenset[str] = frozenset()   # always refused

    def __post_init__(self) -> None:
        if self.min_stake < 0:
            raise ValueError(f"min_stake must be >= 0, got {self.min_stake}")
        both = self.allow & self.deny
        if both:
            raise ValueError(f"hotkeys both allowed and denied: {', '.join(sorted(both))}")

    def refusal(self, hotkey: str | None, view: MetagraphView | None) -> str | None:
        """Why this caller is refused, or None to serve it. Looks the hotkey up before using its neuron, so an
        unknown hotkey is refused, not an exception."""
        if not hotkey:
            return "the request carries no hotkey"
        if hotkey in self.deny:
            return f"hotkey {hotkey} is denylisted"
        if hotkey in self.allow:
            return None
        if view is None:
            return "the miner has no metagraph yet (first sync pending)"
        neuron = view.get(hotkey)
        if neuron is None:
            return f"hotkey {hotkey} is not registered on the subnet"
        if self.force_validator_permit and not neuron.validator_permit:
            return f"hotkey {hotkey} (uid {neuron.uid}) has no validator permit"
        if neuron.stake < self.min_stake:
            return f"hotkey {hotkey} (uid {neuron.uid}) has stake {neuron.stake:g}, below the minimum {self.min_stake:g}"
        return None

    @staticmethod
    def priority(hotkey: str | None, view: MetagraphView | None) -> float:
        """The caller's stake (0 when unknown): higher-stake validators are served first under load."""
        neuron = None if not hotkey or view is None else view.get(hotkey)
        return 0.0 if neuron is None else neuron.stake
