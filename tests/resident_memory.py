"""New resident memory for tests that watch RSS move: a fresh anonymous mapping with every page written once.

Not a tensor or a bytearray: malloc may serve those from heap pages that an earlier test in the same pytest-xdist
worker freed but kept resident, and then RSS does not rise (seen in CI: a 150 MB tensor left RSS where it was).
A mapping is the process's own new memory whatever the heap holds, and munmap (when the object is freed) gives it
back at once."""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE


def resident(nbytes: int) -> mmap.mmap:
    """`nbytes` of new resident memory, returned to the OS when the object is freed."""
    block = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, PAGE):
        block[offset] = 1
    return block
