"""Trains the image demo's base UNet on plain digits and stores it in datainf_core/assets.

Usage: .venv/bin/python bench/make_image_base.py [--steps N] [--max-seconds S] [--seed K]
The result (float16, under 5 MB) is committed so that `datainf demo image` skips this step.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from datainf_core.demos import image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=image.BASE_STEPS)
    parser.add_argument("--max-seconds", type=float, default=image.BASE_MAX_SECONDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(image.ASSET_DIR))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy CPU)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(args.threads)
    out = image.train_image_base(
        args.out, steps=args.steps, max_seconds=args.max_seconds, seed=args.seed
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
