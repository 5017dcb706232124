"""DC-ASGD's record of the params each worker was sent (Zheng et al. 2017).

Delay compensation corrects a gradient with the difference between the params it is
applied to and the params it was computed on, so the server keeps, per worker, the params
it sent at each version. Gradients a bundle queued before a pull arrive after it, so the
params are looked up by the push's base version, not taken from the latest pull; a
record older than `max_staleness` versions can serve no push the server accepts and is
dropped, and so is every record below a push's base version (a worker's base versions
never decrease). The params are references to the server's immutable jax arrays: a
record costs no copy.
"""

from __future__ import annotations

import jax


class StaleParams:
    """Per worker, the params it was sent at each version it has not yet moved past."""

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self._sent: dict[int, dict[int, jax.Array]] = {}

    def sent(self, worker: int, version: int, params: jax.Array) -> None:
        """Record that `worker` was sent `params` at `version`."""
        held = self._sent.setdefault(worker, {})
        held[version] = params
        too_old = version - self.max_staleness  # pushes on these are refused
        for old in [v for v in held if v < too_old]:
            del held[old]

    def for_push(self, worker: int, base_version: int | None) -> jax.Array | None:
        """The params `worker` computed a gradient on (sent at `base_version`; None: its
        latest), or None when there is no record (then the push is applied uncompensated,
        to the params current when it is applied)."""
        held = self._sent.get(worker)
        if not held:
            return None
        if base_version is None:
            base_version = max(held)
        for old in [v for v in held if v < base_version]:
            del held[old]
        return held.get(base_version)

    def versions(self, worker: int) -> list[int]:
        """The versions held for `worker`, oldest first (for tests and statistics)."""
        return sorted(self._sent.get(worker, {}))
