"""Data-parallel training pieces: one flat gradient all-reduce, and opt-in sharded embedding tables.

Equal to one process. Each rank's loss is ``sum_t w_t * loss_sum_t(rank) / count_t(all ranks)``
(:func:`recfm.recipes.train.step_loss`); the samples of a batch are independent (jagged attention per sample,
per-token norms, per-exposure heads), so the gradient of one process on the union of the ranks' batches is
the *sum* of the ranks' gradients. :func:`sum_gradients` sums them in one flat buffer together with

* one "has a gradient" flag per parameter: a parameter no rank touched this step (the tokenizer and head of
  a scenario absent from every rank's batch) keeps ``grad = None``, as it would in one process, so AdamW
  skips it (a zero gradient would still decay its weights and move it by its momentum);
* a few extra scalars (the step's loss and each task's loss sum), so every rank logs and checks the global
  values: a non-finite loss on one rank stops every rank at the same step instead of leaving the others
  waiting in the next collective.

Sharded tables (``train.shard_embeddings``). torchrec's ``DistributedModelParallel`` shards the embedding
collections of :class:`~recfm.foundation.model.adapters.TokenEmbedder` table-wise or row-wise over the ranks
(planner's choice; data-parallel sharding is excluded: torchrec 1.8 miscounts lookups of variable-length
bags with it). Lookups and gradients travel by all-to-all; each table shard is updated during the backward
pass by fbgemm's fused exact row-wise Adagrad (the same update as torchrec's ``RowWiseAdagrad`` used without
sharding), so these tables are left out of the flat all-reduce and out of gradient clipping. It needs
fbgemm's table-batched embedding kernels for the device: the CPU ones (``fbgemm-gpu-cpu``, gloo) or the CUDA
ones (``fbgemm-gpu``, NCCL); :func:`check_sharding` raises :class:`ConfigError` naming the key otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from recfm.errors import ConfigError

KEY = "train.shard_embeddings"


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_gradients(params: list[nn.Parameter], extras: torch.Tensor) -> torch.Tensor:
    """Sum ``params``' gradients and the 1-D ``extras`` over ranks (module docstring); returns the summed extras.

    Without a process group nothing moves and ``extras`` comes back as it is.
    """
    if not is_distributed():
        return extras
    device = params[0].device if params else extras.device
    grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device) for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([*grads, flags, extras.detach().float().to(device)])
    comm = _comm_device(device)
    flat = flat.to(comm)
    dist.all_reduce(flat)
    flat = flat.to(device)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    touched = flat[offset : offset + len(params)].cpu().tolist()  # one small copy per step (host needs it)
    for p, hit in zip(params, touched):
        if hit == 0:
            p.grad = None
    offset += len(params)
    return flat[offset:]


def broadcast_module(module: nn.Module, device: torch.device) -> None:
    """Copy rank 0's parameters and buffers to every rank (plain tensors only; sharded tables are skipped)."""
    if not is_distributed():
        return
    comm = _comm_device(device)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta:
                continue
            buf = t.detach().to(comm).clone()
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


# ------------------------------------------------------------------------------------- sharded tables
def check_sharding(device: torch.device, source: str = "<config>") -> None:
    """Raise :class:`ConfigError` (naming ``train.shard_embeddings``) when tables cannot be sharded here."""
    problems = []
    if not is_distributed():
        return
    try:
        import fbgemm_gpu  # noqa: F401 - registers the fbgemm operators
        import torchrec.distributed  # noqa: F401
    except ImportError as e:
        problems.append(f"{source}: {KEY}: torchrec.distributed or fbgemm_gpu cannot be imported ({e})")
    else:
        key = "CUDA" if device.type == "cuda" else "CPU"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::asynchronous_complete_cumsum", key):
            problems.append(
                f"{source}: {KEY}: sharding embedding tables on {device.type} needs fbgemm's {key} kernels, and the "
                f"installed fbgemm_gpu has none (on CUDA install the CUDA build `fbgemm-gpu`); set {KEY}=false to "
                "train with replicated tables (gradients summed by all-reduce)"
            )
    if problems:
        raise ConfigError(problems)


@dataclass
class ShardedTables:
    """The model's embedding collections sharded by torchrec, and their fused optimiser.

    Attributes:
        dmp: the ``DistributedModelParallel`` around ``model.embedder.collections`` (dense parts not wrapped).
        optimizer: torchrec's fused optimiser of the table shards (applied during backward).
        params: the sharded tables' parameters (left out of the flat all-reduce and of clipping).
    """

    dmp: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]

    def set_lr(self, lr: float) -> None:
        """Learning rate of the next backward's table updates (fused: they happen inside backward)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()  # fused optimisers only push the lr to the kernels here

    def full_state(self, state):
        """``state`` with the table shards gathered into full tensors on rank 0 (collective)."""
        return gather_sharded(state)

    def load(self, model: nn.Module, optimizers: list, model_state: dict, optimizer_states: list) -> None:
        """Load full (unsharded) model and optimiser states: table rows and row-wise Adagrad accumulators go
        into this rank's shards, the rest is loaded as usual."""
        current = model.state_dict()
        load_sharded(current, model_state)
        model.load_state_dict({k: current[k] if _is_sharded(current.get(k)) else v for k, v in model_state.items()})
        for o, s in zip(optimizers, optimizer_states):
            if o is self.optimizer:
                load_sharded(o.state_dict(), s)
            else:
                o.load_state_dict(s)


def shard_tables(
    model: nn.Module, sparse_lr: float, sparse_eps: float, device: torch.device, source: str = "<config>"
) -> ShardedTables:
    """Shard ``model.embedder.collections`` in place over the process group (module docstring)."""
    check_sharding(device, source)
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv, ShardingType

    from torchrec.distributed.comm_ops import set_gradient_division

    # torchrec divides the tables' gradients by the world size by default (to match DDP's averaging); our
    # losses are already divided by the global exposure counts, so the ranks' gradients must be summed.
    set_gradient_division(False)
    collections = model.embedder.collections
    before = {k: v.detach().clone() for k, v in collections.state_dict().items()}
    configs = {name: ec.embedding_configs() for name, ec in collections.items()}
    world = dist.get_world_size()
    kinds = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
    constraints = {c.name: ParameterConstraints(sharding_types=kinds) for cs in configs.values() for c in cs}
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": sparse_lr, "eps": sparse_eps}
    sharders = [EmbeddingCollectionSharder(fused_params=fused)]
    topology = Topology(world_size=world, compute_device=device.type)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        collections, sharders, dist.GroupMember.WORLD
    )
    dmp = DistributedModelParallel(
        collections, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device, plan=plan,
        sharders=sharders, init_data_parallel=False,
    )
    sharded = dmp.module
    for name, module in sharded.items():
        module.embedding_configs = (lambda cs: (lambda: cs))(configs[name])  # the embedder reads the key order
    model.embedder.collections = sharded
    load_sharded(sharded.state_dict(), before)  # the tables keep their (rank-0-identical) initial rows
    return ShardedTables(dmp=dmp, optimizer=dmp.fused_optimizer, params=list(sharded.parameters()))


def _is_sharded(value) -> bool:
    return hasattr(value, "local_shards") and hasattr(value, "gather")


def gather_sharded(state, dst: int = 0):
    """``state`` (nested dicts/lists) with every ShardedTensor gathered into a full tensor on rank ``dst``
    (``None`` on the other ranks). Collective: every rank calls it with the same structure."""
    if _is_sharded(state):
        full = torch.zeros(state.size(), dtype=state.dtype) if dist.get_rank() == dst else None
        state.gather(dst=dst, out=full)
        return full
    if isinstance(state, dict):
        return type(state)((k, gather_sharded(v, dst)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(gather_sharded(v, dst) for v in state)
    return state


def load_sharded(state, full) -> None:
    """Copy the full tensors of ``full`` into the local shards of the matching ShardedTensors of ``state``."""
    if _is_sharded(state):
        with torch.no_grad():
            for shard in state.local_shards():
                index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index].to(shard.tensor.device, shard.tensor.dtype))
    elif isinstance(state, dict):
        for k, v in state.items():
            load_sharded(v, full[k])
    elif isinstance(state, (list, tuple)):
        for v, f in zip(state, full):
            load_sharded(v, f)


def all_ranks_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of host numbers over ranks (the values themselves without a process group)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.cpu().tolist()


