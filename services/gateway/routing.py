"""Which engine a new request goes to, when one gateway fronts several (``--data-parallel-size``).

Policy only: ``EngineClient`` gives the engines that are up and their loads, and sends.

* ``prefix`` (the default): the engine that last took the longest run of this prompt's leading
  full blocks probably still holds them in its prefix cache, so it gets the request, unless it is
  busier than the least loaded engine by more than ``balance_slack`` requests. A prompt with no
  known prefix goes to the least loaded engine. This is SGLang's cache-aware routing in small:
  an approximate, gateway-side index of what each engine was sent, not what it still caches.
* ``least-loaded``: the fewest running + waiting requests (ties in turn, so idle engines share
  even requests that arrive one at a time).
* ``round-robin``: in turn.

The index keys are chained hashes of the prompt's full blocks (block size from the engines'
stats), seeded by the request's ``cache_salt``, so two tenants' equal prompts do not attract
each other (their KV is not shared anyway, see shared/block_hash.py). It is bounded (LRU) and
an entry names the engine's life, so an engine that restarted (its cache empty) is not chosen
for what its previous life held.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from shared.config import ROUTING_POLICIES


class Router:
    def __init__(self, policy: str = "prefix", balance_slack: int = 8, max_entries: int = 1 << 18):
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        self.policy, self.balance_slack, self.max_entries = policy, balance_slack, max_entries
        self._index: OrderedDict[int, tuple[int, int]] = OrderedDict()   # block chain hash -> (engine, life)
        self._next = 0
        self.affinity_hits = 0          # requests sent where their prefix was (for tests and logs)

    @staticmethod
    def block_hashes(prompt: Sequence[int], block_size: int, salt: Optional[str]) -> list[int]:
        """Chained hashes of the prompt's full blocks: hash i covers tokens [0, (i + 1) * block_size)."""
        if block_size <= 0:
            return []
        h, out = hash(salt or ""), []
        for end in range(block_size, len(prompt) + 1, block_size):
            h = hash((h, tuple(prompt[end - block_size:end])))
            out.append(h)
        return out

    def pick(self, loads: Sequence[Optional[int]], lives: Sequence[int], prompt: Sequence[int],
             block_size: int, salt: Optional[str] = None) -> int:
        """The engine for a new request: ``loads[i]`` is engine i's load, None when it is down
        (at least one is up); ``lives[i]`` counts its restarts. Records the choice in the index."""
        up = [i for i, load in enumerate(loads) if load is not None]
        if self.policy == "round-robin":
            choice = up[self._next % len(up)]
            self._next += 1
            return choice
        low = min(loads[i] for i in up)
        ties = [i for i in up if loads[i] == low]
        least = ties[self._next % len(ties)]
        self._next += len(ties) > 1
        if self.policy == "least-loaded":
            return least
        hashes = self.block_hashes(prompt, block_size, salt)
        choice = least
        for h in reversed(hashes):                  # the longest prefix an engine still up was sent
            entry = self._index.get(h)
            if entry is None or loads[entry[0]] is None or lives[entry[0]] != entry[1]:
                continue
            if loads[entry[0]] - loads[least] <= self.balance_slack:
                choice = entry[0]
                self.affinity_hits += 1
            break
        for h in hashes:
            self._index[h] = (choice, lives[choice])
            self._index.move_to_end(h)
        while len(self._index) > self.max_entries:
            self._index.popitem(last=False)
        return choice
