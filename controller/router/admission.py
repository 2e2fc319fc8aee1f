"""The router's admission queue: which request goes to a node now, by tier."""

from __future__ import annotations


class OpenAdmission:
    """No queue: every request is dispatched at once (placeholder until tiers land)."""

    async def enter(self, p, rank) -> None:  # noqa: ARG002
        return None

    def leave(self, p) -> None:  # noqa: ARG002
        return None

    def depths(self) -> dict[int, int]:
        return {}


def build_admission(cfg, fleet):  # noqa: ARG001
    return OpenAdmission()
