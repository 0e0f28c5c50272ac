"""Recipes: the functions behind ``recfm pretrain | finetune | evaluate`` (imported lazily: they need torchrec)."""

from __future__ import annotations


def pretrain(config=None, overrides=(), progress: bool = True):
    from recfm.recipes.pretrain import pretrain as run

    return run(config, overrides, progress)


def finetune(config=None, overrides=(), from_ckpt=None, progress: bool = True):
    from recfm.recipes.finetune import finetune as run

    return run(config, overrides, from_ckpt=from_ckpt, progress=progress)


def evaluate(config=None, overrides=(), ckpt=None, progress: bool = True):
    from recfm.recipes.finetune import evaluate as run

    return run(config, overrides, ckpt=ckpt, progress=progress)
