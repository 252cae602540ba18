"""One FCMAE training step per available backend on built-in images.

Every backend gets the same weights, images and mask, so the losses printed side by
side should agree to float precision.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from sparse_mae import create_model
from sparse_mae.backends import backend_availability, list_backends
from sparse_mae.data.builtin import builtin_batch, normalize
from sparse_mae.flops import fcmae_gmacs


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
    reference = create_model(args.model, mask_ratio=args.mask_ratio)
    state = reference.state_dict()
    mask = reference.random_masking(args.batch, reference.patchify(imgs).shape[1],
                                    generator=torch.Generator().manual_seed(args.seed))
    gmacs = fcmae_gmacs(reference, (args.size, args.size), mask=mask)
    print(f"{args.model}  batch {args.batch}  {args.size}x{args.size}  mask ratio {args.mask_ratio}  "
          f"visible fraction {float((mask == 0).float().mean()):.3f}")
    print(f"GMACs per image: encoder dense {gmacs.encoder_dense:.3f}, encoder useful (visible only) "
          f"{gmacs.encoder_useful:.3f}, decoder {gmacs.decoder:.3f}")
    print(f"{'backend':<14}{'loss':>12}{'step s':>10}")
    for name in list_backends():
        ok, reason = backend_availability(name)
        if not ok:
            print(f"{name:<14}  skipped: {reason}")
            continue
        model = create_model(args.model, backend=name, mask_ratio=args.mask_ratio)
        model.load_state_dict(state)
        opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
        start = time.perf_counter()
        loss, _, _ = model(imgs, mask=mask)
        loss.backward()
        opt.step()
        print(f"{name:<14}{loss.item():>12.6f}{time.perf_counter() - start:>10.3f}")
    return 0
