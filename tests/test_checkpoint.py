"""Checkpoints are atomic: a kill during a write leaves the previous checkpoint and `latest` intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from recfm.errors import RecfmError
from recfm.recipes.checkpoint import Checkpointer, load


def _payload(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "spec": {"scenarios": {}}}


def test_save_load_roundtrip_and_pruning(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(_payload(float(step)), step)
    files = sorted(p.name for p in tmp_path.glob("step-*.pt"))
    assert files == ["step-00000002.pt", "step-00000003.pt"]
    got = load(tmp_path)
    assert got["step"] == 3 and torch.equal(got["model"]["w"], torch.full((4,), 3.0))
    assert "rng" in got and got["recfm"]


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(RecfmError, match="no checkpoint found"):
        load(tmp_path)
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RecfmError, match="x.pt: not a readable recfm checkpoint"):
        load(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(RecfmError, match="not a recfm checkpoint"):
        load(bad)


def test_kill_during_write_keeps_previous(tmp_path):
    """A child process saves step 1, then is SIGKILLed in the middle of writing a large step 2."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        from recfm.recipes import checkpoint as c
        ck = c.Checkpointer({str(tmp_path)!r})
        ck.save({{"model": {{"w": torch.ones(4)}}, "spec": {{}}}}, 1)
        real_save = torch.save
        def slow_save(obj, f):
            f.write(b"partial" * 1000)
            f.flush()
            print("writing", flush=True)
            import time; time.sleep(60)
        c.torch.save = slow_save
        ck.save({{"model": {{"w": torch.zeros(4)}}, "spec": {{}}}}, 2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.glob(".step-*.tmp"))
    assert leftovers, "the killed write should have left only a temporary file"
    got = load(tmp_path)
    assert got["step"] == 1 and torch.equal(got["model"]["w"], torch.ones(4))
    assert not (tmp_path / "step-00000002.pt").exists()
