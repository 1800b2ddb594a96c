"""Small arithmetic shared across the code base."""


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: how many blocks of b hold a tokens."""
    return -(a // -b)
