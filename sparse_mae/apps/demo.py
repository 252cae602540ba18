"""One FCMAE training step per available backend on built-in images.

Every backend gets the same weights, images and masks, and runs the training engine's own
step (sparse_mae.train.step) with the pretraining recipe's optimizer, so the losses printed
side by side should agree to float precision.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from sparse_mae import create_model
from sparse_mae.backends import backend_availability, list_backends
from sparse_mae.config import PretrainConfig
from sparse_mae.data.builtin import builtin_batch
from sparse_mae.data.transforms import normalize
from sparse_mae.flops import fcmae_gmacs
from sparse_mae.models.fcmae import masks_from_seeds
from sparse_mae.train import step as training_step
from sparse_mae.train.schedule import peak_lr


def main() -> int:
    parser = argparse.ArgumentParser(prog=sys.argv[0], description=__doc__)
    parser.add_argument("--model", default="fcmae_convnextv2_atto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:])

    torch.manual_seed(args.seed)
    imgs = normalize(builtin_batch(args.batch, args.size, seed=args.seed)[0])
    batch = {"image": imgs, "seed": torch.arange(args.batch) + args.seed * args.batch}
    reference = create_model(args.model)
    state = reference.state_dict()
    mask = masks_from_seeds(batch["seed"], reference.patchify(imgs).shape[1], args.mask_ratio)
    gmacs = fcmae_gmacs(reference, (args.size, args.size), mask=mask)
    print(f"{args.model}  batch {args.batch}  {args.size}x{args.size}  mask ratio {args.mask_ratio}  "
          f"visible fraction {float((mask == 0).float().mean()):.3f}")
    print(f"GMACs per image: encoder dense {gmacs.encoder_dense:.3f}, encoder useful (visible only) "
          f"{gmacs.encoder_useful:.3f}, decoder {gmacs.decoder:.3f}")
    print(f"{'backend':<14}{'loss':>12}{'step s':>10}")
    recipe = PretrainConfig().optim
    for name in list_backends():
        ok, reason = backend_availability(name)
        if not ok:
            print(f"{name:<14}  skipped: {reason}")
            continue
        model = create_model(args.model, backend=name)
        model.load_state_dict(state)
        optimizer = training_step.build_optimizer(
            training_step.fcmae_param_groups(model, recipe.weight_decay), recipe,
            lr=peak_lr(recipe, args.batch), device=imgs.device)
        start = time.perf_counter()
        result = training_step.train_step(
            model, lambda m, b, micro: training_step.fcmae_loss(m, b, args.mask_ratio), [batch], optimizer,
            [p for p in model.parameters() if p.requires_grad])
        print(f"{name:<14}{result.loss:>12.6f}{time.perf_counter() - start:>10.3f}")
    return 0
