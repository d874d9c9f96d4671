"""
Sharded data parallelism for train_vlm.py (fsdp=True under torchrun): FSDP2, torch.distributed.fsdp.fully_shard,
the engine torchtitan and torchtune build on, and the checkpoints of a sharded run. Each of N processes keeps 1/N
of the weights, gradients and optimizer state, and all-gathers a block's weights just before it runs (ZeRO-3),
where DDP keeps a whole copy of all three on every process.

    shard_model          fully_shard each decoder block and each vision block, then the root (embeddings,
                         connector, output head)
    unshard / reshard    the whole model on every process for a while, to evaluate with no collective
    full_weights         the consolidated weights on rank 0's CPU, for ckpt.pt, best.pt and weights.pt
    save_sharded         the model's and optimizer's shards through torch.distributed.checkpoint (DCP): every
    load_sharded         process writes its own; they load back at any world size, sharded or not
"""
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

SHARDED_DIR = 'sharded'  # in out_dir: one DCP directory per checkpoint, the one ckpt.pt names kept


def decoder_blocks(llm):
    """The language model's blocks, each one FSDP unit: glimpse's Decoder's layers, or a Hugging Face causal LM's
    decoder layers (the classes its _no_split_modules names: PhiDecoderLayer, Gemma2DecoderLayer, GPT2Block)."""
    if hasattr(llm, 'layers'):
        return list(llm.layers)
    names = set(getattr(llm.model, '_no_split_modules', None) or ())
    blocks = [m for m in llm.model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f'fsdp: found no decoder layers in {type(llm.model).__name__} (its _no_split_modules '
                         f'names none); train it with fsdp=False')
    return blocks


def shard_model(model, device_type, dtype):
    """Shard a glimpse VLM in place over the process group: each vision block and each decoder block is one FSDP
    unit, the root holds the rest (patch and token embeddings, connector, final norm, output head: the tied head
    and embedding must share a unit). bf16 runs all-gather and compute in bf16 and reduce gradients in fp32
    (MixedPrecisionPolicy); the sharded weights, their gradients and the optimizer state stay fp32. A frozen
    part is sharded as the rest, and all-gathered for its forward. Before the optimizer is made: it must hold
    the sharded parameters (DTensors). Returns the number of blocks sharded."""
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == 'bfloat16' \
        else MixedPrecisionPolicy()
    blocks = [*model.vision_tower.blocks, *decoder_blocks(model.llm)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return len(blocks)


def units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unshard(model):
    """Every process all-gathers every unit's weights and keeps them (no resharding after a forward) until reshard:
    forward and generate then run with no collective, so generation may stop at another step on each process.
    Every process should run the same evaluation in between: FSDP orders its backward prefetches by the forwards
    it saw, which must agree across processes (one process evaluating alone desynchronises the next backward's
    all-gathers). It holds the whole model's weights (in the compute dtype) on each process for that while, not
    its gradients or optimizer state. All processes call it together."""
    for m in units(model):
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()


def reshard(model):
    """Back to training after unshard: every unit's weights freed to its shard; the blocks reshard after each
    forward again (the root does not: its weights are needed at once by the backward, as fully_shard sets it)."""
    for m in units(model):
        m.reshard()
        if m is not model:
            m.set_reshard_after_forward(True, recurse=False)


def trained_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def full_weights(model, trained_only):
    """The consolidated weights, gathered to rank 0's CPU one tensor at a time (the other ranks get {}): the
    state_dict a DDP run saves, or with trained_only what checkpoint.trained_state_dict keeps (the trained
    parameters; frozen ones are not even gathered). All processes call it together."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=trained_only))
    if trained_only:
        names = trained_names(model)
        sd = {k: v for k, v in sd.items() if k in names}
    return sd


def load_full_weights(model, sd, trained_only):
    """Consolidated weights (full_weights', every process holding them) copied into the shards. All processes
    call it together."""
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=not trained_only))


def save_sharded(model, optimizer, out_dir, iter_num, trained_only):
    """The model's (trained_only: its trained parameters') and the optimizer's shards, each process writing its own
    files (no process ever holds the whole optimizer state), into out_dir/sharded/iter_N.tmp, which rank 0 renames
    to iter_N once every process has written: a crash leaves a .tmp, never a half-written directory under the name
    a ckpt.pt gives. Returns that name, relative to out_dir. All processes call it together."""
    name = os.path.join(SHARDED_DIR, f'iter_{iter_num:07d}')
    path, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + '.tmp')
    if dist.get_rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()  # nobody writes into a .tmp rank 0 is clearing
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trained_only))
    dcp.save({'model': model_sd, 'optimizer': optim_sd}, checkpoint_id=tmp)  # its last step: rank 0 writes .metadata
    if dist.get_rank() == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    return name


def load_sharded(model, optimizer, path, trained_only):
    """Model and optimizer state from a save_sharded directory into this run's: sharded (fsdp) or whole (one
    process, DDP) and at any world size; DCP reads the parts of each tensor this process holds."""
    options = StateDictOptions(ignore_frozen_params=trained_only, strict=not trained_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {'model': model_sd, 'optimizer': optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'],
                   options=options)


def remove_stale_shards(out_dir, keep):
    """After ckpt.pt names the directory keep: every other one under out_dir/sharded (older checkpoints, a .tmp a
    crash left) goes."""
    root = os.path.join(out_dir, SHARDED_DIR)
    for entry in os.listdir(root):
        if os.path.join(SHARDED_DIR, entry) != keep:
            shutil.rmtree(os.path.join(root, entry))
