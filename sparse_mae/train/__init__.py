"""Training machinery shared by the pretraining and fine-tuning apps.

- engine:     the one step loop (MAE's engine_pretrain.py): a TrainTask from the app, lr per
              step, micro-batches, autocast, clipping, the non-finite policy, logging,
              checkpoint cadence and resume
- rundir:     a run directory belongs to one run: lock, fresh-start refusal, clean-up
- checkpoint: atomic save with a checksum record, rotation, resume from the newest good one
- schedule:   per-iteration linear warmup + half-cosine learning rate
- rng:        capture / restore every RNG the loop touches (exact resume)
- sampler:    DistributedSampler that can start mid-epoch and hands out per-sample seeds
- distributed: torchrun set-up (DDP; gloo on CPU, nccl on CUDA), rank-0 decisions
- metrics:    tqdm progress, JSON-lines metrics file, optional wandb
- optim:      AdamW parameter groups (no weight decay on norms, biases, tokens)
- errors:     the ways a run stops itself on purpose
"""
