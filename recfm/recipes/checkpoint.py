"""Atomic, self-describing checkpoints.

A checkpoint is one file ``<run>/checkpoints/step-<N>.pt`` holding::

    model        state_dict of the whole model (adapters, backbone, heads, embeddings)
    optimizers   {name: state_dict}      dense AdamW and the sparse embedding optimiser
    scheduler    state_dict
    data         the loader position (epoch, cursor, shuffle RNG) so a resumed run sees the same batches
    rng          torch / numpy / python (and CUDA) generator states
    step         the number of optimiser steps taken
    config       the resolved run config (plain dict) - what produced it
    spec         {"scenarios": {name: fingerprint}, "sequences": fingerprint, "model": fingerprint}
    recfm        the library version

Writing is atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and the file
is renamed over its final name (``os.replace``); then ``latest`` (a one-line text file naming it) is
replaced the same way. A kill at any moment leaves the previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import recfm
from recfm.errors import RecfmError

LATEST = "latest"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` into a temporary sibling of ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpointer:
    """Saves ``step-<N>.pt`` files atomically under ``folder`` and keeps the ``keep`` newest."""

    folder: Path
    keep: int = 2

    def __post_init__(self):
        self.folder = Path(self.folder)

    def save(self, payload: dict, step: int) -> Path:
        payload = {**payload, "step": step, "rng": rng_state(), "recfm": recfm.__version__}
        path = self.folder / f"step-{step:08d}.pt"
        atomic_write_bytes(path, lambda f: torch.save(payload, f))
        atomic_write_bytes(self.folder / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
        self._prune(keep_also=path)
        return path

    def _prune(self, keep_also: Path) -> None:
        files = sorted(self.folder.glob("step-*.pt"))
        for old in files[: max(0, len(files) - self.keep)]:
            if old != keep_also:
                old.unlink(missing_ok=True)
        for tmp in self.folder.glob(".step-*.tmp"):  # leftovers of a write that was killed
            tmp.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the folder holds none."""
        pointer = self.folder / LATEST
        if pointer.is_file():
            candidate = self.folder / pointer.read_text().strip()
            if candidate.is_file():
                return candidate
        files = sorted(self.folder.glob("step-*.pt"))
        return files[-1] if files else None


def load(path: str | Path) -> dict:
    """Load a checkpoint file (or the latest one in a run/checkpoints folder) onto the CPU."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = Checkpointer(folder).latest()
        if found is None:
            raise RecfmError(f"{path}: no checkpoint found (expected step-*.pt files)")
        path = found
    if not path.is_file():
        raise RecfmError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise RecfmError(f"{path}: not a readable recfm checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or "model" not in payload or "spec" not in payload:
        raise RecfmError(f"{path}: not a recfm checkpoint (no 'model'/'spec' entries)")
    payload["path"] = str(path)
    return payload
