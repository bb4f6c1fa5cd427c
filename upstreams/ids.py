"""Response ids in FastChat's format: a prefix and 22 characters of shortuuid's alphabet."""
from __future__ import annotations

import random

import shortuuid

ALPHABET = shortuuid.get_alphabet()
# Ids only need to be unique, not secret: the fast Mersenne Twister instead of shortuuid's
# SystemRandom, which reads the OS entropy pool for every character.
_random = random.Random()


def random_id(prefix: str) -> str:
    return prefix + "".join(_random.choices(ALPHABET, k=22))
