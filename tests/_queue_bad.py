"""Process targets and items for test_queue_get_errors (module level, so they work under spawn)."""


def _refuse(text):
    raise ValueError(f"this item refuses to be unpickled: {text}")


class Unloadable:
    """Pickles fine; unpickling it raises ValueError (as an item whose class
    changed, or whose module the getter cannot import, would)."""

    def __init__(self, text="bad"):
        self.text = text

    def __reduce__(self):
        return (_refuse, (self.text,))


def put_items(q, items):
    """Put ``items``, where ("unloadable", text) stands for Unloadable(text)
    (made here: under spawn the arguments themselves are unpickled)."""
    for it in items:
        if isinstance(it, tuple) and it[0] == "unloadable":
            it = Unloadable(it[1])
        q.put(it, timeout=30)
