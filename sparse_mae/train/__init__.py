"""Generic training machinery shared by the pretraining and fine-tuning apps.

- checkpoint: atomic save (temp + fsync + rename), keep-last-K, `resume=auto`, config beside
- schedule:   per-iteration linear warmup + half-cosine learning rate
- rng:        capture / restore every RNG the loop touches (exact resume)
- sampler:    DistributedSampler that can start mid-epoch and hands out per-sample seeds
- distributed: torchrun set-up (DDP; gloo on CPU, nccl on CUDA), rank-0 helpers
- metrics:    tqdm progress, JSON-lines metrics file, optional wandb
- optim:      AdamW parameter groups (no weight decay on norms, biases, tokens)
"""
