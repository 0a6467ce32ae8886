"""``dsmi variants``: the model variants and their sizes (model.factory)."""

from __future__ import annotations

import argparse

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="only the *-small CPU variants")


def run(args: argparse.Namespace) -> int:
    from model import VARIANTS, build_model

    print(f"{'variant':<22} {'trunk(s)':<24} {'fusion':<9} {'pooling':<7} "
          f"{'d':>4} {'hidden':>6} {'fc':>4} {'input':>8} {'params':>11}")
    for name, spec in VARIANTS.items():
        if args.small and not name.endswith("-small"):
            continue
        trunks = spec.trunk if spec.trunk_b is None else f"{spec.trunk}+{spec.trunk_b}"
        # weights=None: counting parameters needs no pretrained file
        params = sum(p.numel() for p in build_model(name, weights=None).parameters())
        size = "x".join(map(str, spec.input_size))
        print(f"{name:<22} {trunks:<24} {spec.fusion:<9} {spec.pooling:<7} "
              f"{spec.embed_dim:>4} {spec.hidden:>6} {spec.fc_dim:>4} {size:>8} {params:>11,}")
    return 0
