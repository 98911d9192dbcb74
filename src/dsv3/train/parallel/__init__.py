"""Distributed training on torch.distributed: FSDP2 data parallelism, expert parallelism with
all-to-all dispatch, node-limited routing, and sharded checkpoints that resume at any world size.

Launch: ``torchrun --nproc-per-node N -m dsv3 train ... [--ep E]`` (see docs/distributed.md).
Everything here is applied to the single-device model from outside it:

    dist.py             torchrun environment -> process group (NCCL on GPU, gloo on CPU)
    expert_parallel.py  routed experts sharded over an EP group; all-to-all dispatch / combine
    parallelize.py      parallelize(model, ...): EP, then FSDP2 per block and root; global grad-norm clip
    checkpoint.py       sharded checkpoints (torch.distributed.checkpoint): any layout resumes any save
    training.py         ParallelTraining: the calls the training loop (train/loop.py) makes under torchrun
    pipeline.py         --pp: stages cut from the model, torch.distributed.pipelining schedules, pp x dp (x ep)

Import the submodules directly; this package imports nothing, so a single-process run never pays
for loading FSDP.
"""
