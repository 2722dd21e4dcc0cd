"""Processes under torchrun, DDP wrapping, and FSDP2 sharding of the trained UNet.

`parallel="ddp"` (default): every process holds the whole model, optimizer and EMA; DistributedDataParallel averages
gradients.  Enough while fp32 weights + AdamW moments + EMA fit a GPU (~16 bytes per trained parameter: ~41 GB for
SDXL's 2.6B-parameter UNet).  `parallel="fsdp"`: FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023,
"PyTorch FSDP") shards the UNet's parameters, gradients, AdamW moments and EMA shadows over the processes (~1/W
each), applied to each block of `input_blocks`, to `middle_block`, to each of `output_blocks`, then to the root
(which owns the rest); a block's parameters are all-gathered for its forward and backward, its gradients
reduce-scattered.  bf16 on CUDA: gathers and compute in bf16, gradients reduced in fp32 into the fp32 shards (AdamW
in fp32).  Frozen networks and trained text encoders stay replicated (the latter all-reduced by hand, as under
DDP); the VAE task trains with DDP only.  Clipping uses the global norm over all shards (`clip_grad_norm`); the EMA
shadows are sharded like the parameters, so updates are local.  Checkpoints keep the one format of
`xldm.train.checkpoint`: every sharded tensor is gathered to rank 0 (`gather_full`), so a file equals a DDP or
one-process one (resumable either way); on resume each process keeps its shard of each tensor (`shard_checkpoint`,
no communication).  Rank 0 then needs host memory for the full training state (~41 GB for SDXL base).

Eight GPUs on one machine, full-size SDXL base (bf16, gradient checkpointing, from the released weights; a global
batch of 32, as `--batch-size` is per process):

    torchrun --standalone --nproc_per_node 8 -m xldm.train.cli --preset sdxl-base \\
        --init sd_xl_base_1.0.safetensors --data shards/{00000..00999}.tar --batch-size 4 --steps 10000 \\
        --out runs/sdxl --set parallel=fsdp

Several machines: torchrun's `--nnodes N --node_rank R --rdzv_endpoint HOST:PORT` instead of `--standalone` (one
flat mesh over all processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
import torch
import torch.distributed as dist
from torch import nn

@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_here: bool = False  # this call initialised the process group (and will destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_processes(config) -> Processes:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device ("auto": this process's GPU if
    there is one, else the CPU) and join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        device = torch.device(config.device if config.device.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if config.device == "auto" else config.device)
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank=rank, world_size=world, local_rank=local, device=device, started_here=started)


def wrap_ddp(module: nn.Module, procs: Processes) -> nn.Module:
    """DistributedDataParallel around `module` when there are several processes, else the module itself."""
    if not procs.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)


def uses_fsdp(config, procs: Processes) -> bool:
    """FSDP is on when asked for and there is more than one process (one process has nothing to shard over)."""
    return config.parallel == "fsdp" and procs.distributed


def shard_unet(unet: nn.Module, procs: Processes, mixed_precision: str) -> nn.Module:
    """Apply FSDP2 to each block of the UNet, then to the UNet itself (in place; returns it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(procs.device.type, (procs.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" and procs.device.type == "cuda" else MixedPrecisionPolicy())
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(unet, mesh=mesh, mp_policy=policy)
    return unet


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm over all processes' shards (and plain tensors), clipped to `max_norm` in place; without
    sharded parameters exactly `torch.nn.utils.clip_grad_norm_`."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    plain = [g for g in grads if not _is_dtensor(g)]
    norm = torch.nn.utils.get_total_norm(sharded, 2.0)
    norm = norm.full_tensor() if _is_dtensor(norm) else norm  # reduced over the shards of every process
    if plain:
        norm = torch.linalg.vector_norm(torch.stack([norm, torch.nn.utils.get_total_norm(plain, 2.0).to(norm)]))
    # the same factor as clip_grad_norm_: max_norm / (norm + 1e-6), at most 1 (a non-finite norm is left to
    # the caller, which then skips the step)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if torch.isfinite(norm):
        for g in grads:
            g.mul_(coefficient.item())
    return norm


GATHER_BUCKET_BYTES = 256 * 2**20  # local shard bytes gathered per collective at save time (our choice)


def _rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of a dim-0 size n that `rank` holds under Shard(0): torch.chunk semantics (FSDP2,
    DTensor), i.e. ceil(n / world) rows per rank, the last ones possibly short or empty."""
    chunk = -(-n // world)
    return min(n, rank * chunk), min(n, rank * chunk + chunk)


def _gather_bucket(bucket: list[tuple[str, torch.Tensor]], procs: Processes, out: dict) -> None:
    """One all-gather for several Shard(0) DTensors: each process sends its local shards flattened end to end
    (padded to the longest process's length); rank 0 cuts the pieces back out and stacks each tensor's rows."""
    world = procs.world_size
    mesh = bucket[0][1].device_mesh
    sizes = [[(end - start) * (t.shape.numel() // max(t.shape[0], 1))
              for _, t in bucket for start, end in [_rows(t.shape[0], world, r)]] for r in range(world)]
    local = torch.cat([t._local_tensor.reshape(-1) for _, t in bucket])  # (to_local() without autograd)
    if local.numel() != sum(sizes[procs.rank]):
        raise RuntimeError("FSDP shard sizes do not follow torch.chunk semantics; cannot gather the checkpoint")
    longest = max(sum(row) for row in sizes)
    send = torch.zeros(longest, dtype=local.dtype, device=local.device)
    send[: local.numel()] = local
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=mesh.get_group())
    if not procs.is_main:
        return
    pieces = [list(torch.split(received[r][: sum(sizes[r])].cpu(), sizes[r])) for r in range(world)]
    for i, (key, t) in enumerate(bucket):
        out[key] = torch.cat([pieces[r][i] for r in range(world)]).reshape(t.shape)


def gather_full(tensors: dict[str, torch.Tensor], procs: Processes) -> dict[str, torch.Tensor]:
    """Full CPU copies of `tensors` (sharded ones gathered) on rank 0, {} elsewhere.  A collective: every process
    must call it with the same keys in the same order (they come from state_dict()s, ordered the same on every
    process; every choice below depends only on global shapes, dtypes and placements, so all processes issue the
    same collectives).  Dim-0-sharded tensors of one dtype are gathered in buckets of about GATHER_BUCKET_BYTES (one
    collective each, not one per tensor)."""
    from torch.distributed.tensor import Shard

    gathered: dict[str, torch.Tensor] = {}
    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_bytes = 0
    for key, value in tensors.items():
        # (attribute checks only: operations on DTensors go through their dispatcher, ~0.1 ms each)
        flat = (_is_dtensor(value) and value.device_mesh.ndim == 1 and tuple(value.placements) == (Shard(0),)
                and len(value.shape) > 0)
        if flat:
            fits = not bucket or (value.dtype == bucket[0][1].dtype and value.device_mesh is bucket[0][1].device_mesh)
            if bucket and (not fits or bucket_bytes >= GATHER_BUCKET_BYTES):
                _gather_bucket(bucket, procs, gathered)
                bucket, bucket_bytes = [], 0
            bucket.append((key, value))
            bucket_bytes += value.shape.numel() * value.dtype.itemsize // procs.world_size
            continue
        if _is_dtensor(value):
            value = value.full_tensor()
        if procs.is_main:
            gathered[key] = value.detach().cpu()
    if bucket:
        _gather_bucket(bucket, procs, gathered)
    return {key: gathered[key] for key in tensors} if procs.is_main else {}


def shard_checkpoint(run, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full checkpoint tensors -> the same keys holding this process's shards where the run (xldm.train.run.Run)
    is sharded: the weights of the trained networks (`model.*`), the AdamW moments (`optim.state.<index>.*`) and
    the EMA shadows (`ema.*`).  Everything else is returned as is."""
    from torch.distributed.tensor import distribute_tensor

    targets: dict[str, torch.Tensor] = {}
    for name, module in run.trainable.items():
        targets.update({f"model.{name}.{k}": v for k, v in module.state_dict().items()})
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if run.ema is not None:
        targets.update({f"ema.{k}": v for k, v in run.ema.shadow.items()})
    out = {}
    for key, value in tensors.items():
        like = targets.get(key)
        if like is None and key.startswith("optim.state."):
            index, name = key[len("optim.state."):].split(".", 1)
            param = params[int(index)]
            like = param if name != "step" and tuple(value.shape) == tuple(param.shape) else None
        if like is not None and _is_dtensor(like):  # cut to this process's shard of `like`, no communication
            if tuple(value.shape) != tuple(like.shape):
                raise ValueError(f"checkpoint tensor of shape {tuple(value.shape)} does not fit a parameter of shape "
                                 f"{tuple(like.shape)}")
            value = distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        out[key] = value
    return out


def gather_for_export(run) -> dict[str, nn.Module] | None:
    """Unsharded CPU copies of the sharded trained networks, EMA weights applied (raw weights without EMA), on
    rank 0; None on the other ranks.  A collective: every process calls it."""
    from xldm.models.unet import UNet

    exported: dict[str, nn.Module] = {}
    for name, module in run.trainable.items():
        state = module.state_dict()
        if not any(_is_dtensor(v) for v in state.values()):
            continue
        if run.ema is not None:
            head = f"{name}."
            state.update({k[len(head):]: v for k, v in run.ema.shadow.items() if k.startswith(head)})
        full = gather_full(state, run.procs)
        if not run.procs.is_main:
            continue
        if name != "unet":
            raise NotImplementedError(f"exporting a sharded {name} is not supported (only the UNet is sharded)")
        with torch.device("meta"):
            copy = UNet(run.model.config.unet)
        copy = copy.to_empty(device="cpu")
        dtypes = {k: v.dtype for k, v in copy.state_dict().items()}
        copy.load_state_dict({k: v.to(dtypes[k]) for k, v in full.items()}, strict=True)
        exported[name] = copy.eval()
    return exported if run.procs.is_main else None


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()
