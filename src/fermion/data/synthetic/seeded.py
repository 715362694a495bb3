"""What every generator shares: random streams seeded by a string, and the rule that holds items out for evaluation.

Both are derived from strings with stable functions (`random.Random(str)` and SHA-256), never from the global
generator or `hash()`, so the same seed gives the same data, and the same items are held out, on every machine.
"""

from __future__ import annotations

import hashlib
import random


def rng(kind: str, seed: int) -> random.Random:
    """The random stream of one kind of generated data for one seed."""
    return random.Random(f"fermion.synthetic/{kind}/{seed}")


def held_out(key: str, share: int) -> bool:
    """Whether the item named `key` is for evaluation only (never for training): one key in `share`, chosen by a
    SHA-256 hash of the key."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % share == 0
