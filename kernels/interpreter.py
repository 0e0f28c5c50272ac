"""Running the Triton kernels on a CPU: Triton's interpreter (``TRITON_INTERPRET=1``), as CI does."""

from __future__ import annotations

import functools
import os


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array there) into a loop bound with
    ``int(array)``, which numpy >= 2.4 refuses for 1-d arrays; wrap its tensor patch so ``__index__`` reads
    the single element. Call before a launch whose loop bounds come from tensors; applied once, and only
    does anything under ``TRITON_INTERPRET=1``."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
