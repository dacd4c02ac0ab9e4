"""Prefix-cache keys: SHA-256 over a canonical byte encoding, chained block to block.

The digest of full block ``i`` is ``sha256(parent || len || token ids || extra)`` where
``parent`` is block ``i - 1``'s digest (32 bytes) or, for block 0, the *root*: a constant, or a
digest of the request's ``cache_salt``. ``len`` is the token count (uint32) and each token id a
uint64, little-endian; ``extra`` is ``encode_key(extra_keys)``. Every field is fixed-width or
length-prefixed and ``encode_key`` is prefix-free, so two different inputs never encode to the
same bytes: equal digests mean equal whole prefixes (and equal salts), up to a SHA-256 collision.
Python's ``hash()`` was 64 bits and computable by anyone, so a client could search for a prompt
whose block collides with another tenant's (vLLM's CVE-2025-25183).

Only full blocks are hashed, each once per sequence: ``HashChain`` keeps a sequence's digests,
so a retried admission or a recompute after preemption reuses them.
"""
from __future__ import annotations

import sys
from array import array
from hashlib import sha256
from typing import Hashable, Optional

_LITTLE = sys.byteorder == "little"
ROOT = sha256(b"pagedserve prefix cache v1").digest()      # the parent of an unsalted block 0


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def encode_key(key: Hashable) -> bytes:
    """Tagged, length-prefixed bytes of an extra key: None, bool, int, str, bytes, or a tuple of
    them. Prefix-free (no encoding is the start of another), hence injective, also inside tuples."""
    if key is None:
        return b"N"
    if key is True or key is False:          # before int: bool is an int subclass
        return b"T" if key else b"F"
    if isinstance(key, int):
        raw = key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)
        return b"I" + _u32(len(raw)) + raw
    if isinstance(key, str):
        raw = key.encode("utf-8", "surrogatepass")       # injective on every str
        return b"S" + _u32(len(raw)) + raw
    if isinstance(key, bytes):
        return b"B" + _u32(len(key)) + key
    if isinstance(key, tuple):
        return b"L" + _u32(len(key)) + b"".join(map(encode_key, key))
    raise TypeError(f"unsupported prefix-cache extra key type {type(key).__name__}")


def encode_tokens(token_ids) -> bytes:
    """The token count (uint32) then each id as a uint64, little-endian (every wire id fits)."""
    a = array("Q", token_ids)
    if not _LITTLE:
        a.byteswap()
    return _u32(len(a)) + a.tobytes()


def root_digest(salt: Optional[str] = None) -> bytes:
    """The parent of block 0: ``ROOT`` unsalted, else a digest of the salt, so requests with
    different salts share no block and requests with the same salt share as before."""
    return ROOT if salt is None else sha256(ROOT + encode_key(("cache_salt", salt))).digest()


def chain_digest(parent: bytes, token_ids, extra: bytes = b"N") -> bytes:
    """The digest of a full block under ``parent``; ``extra`` is already ``encode_key``-ed."""
    return sha256(b"".join((parent, encode_tokens(token_ids), extra))).digest()


class HashChain:
    """The digests of one sequence's full blocks, computed on demand and kept. The tokens of a
    full block never change (a sequence only appends), so a digest stays valid for the sequence's
    life, across preemption and recompute."""

    __slots__ = ("block_size", "root", "extra", "digests")

    def __init__(self, block_size: int, salt: Optional[str] = None, extra_keys: Hashable = None):
        self.block_size = block_size
        self.root = root_digest(salt)
        self.extra = encode_key(extra_keys)
        self.digests: list[bytes] = []

    def digest(self, i: int, token_ids) -> bytes:
        """The digest of full block ``i`` of ``token_ids`` (blocks before it hashed first)."""
        d, bs = self.digests, self.block_size
        while len(d) <= i:
            j = len(d)
            d.append(chain_digest(d[-1] if j else self.root, token_ids[j * bs:(j + 1) * bs], self.extra))
        return d[i]

    def copy(self) -> HashChain:
        """For a fork: the child starts with the parent's tokens, so with its digests."""
        c = HashChain.__new__(HashChain)
        c.block_size, c.root, c.extra, c.digests = self.block_size, self.root, self.extra, list(self.digests)
        return c
