"""What a cascade costs: pixels and measured FLOPs per stage, against one model generating the final size directly.

The argument for cascades (Ho et al. 2021, Sec. 1; Imagen, Sec. 2.4): a 64^2 -> 256^2 -> 1024^2 cascade denoises
64^2 + 256^2 + 1024^2 pixels per step, but only the small base model has to decide the composition, and the SR
models can be lighter (fewer channels, attention only at low resolution).  Here the FLOPs of one UNet evaluation
are *measured* with `torch.utils.flop_counter.FlopCounterMode` (it counts matmuls and convolutions: 2 per
multiply-add), running each UNet on the meta device so nothing is computed or allocated.  A stage costs
FLOPs(one evaluation at its size) x steps x (2 with classifier-free guidance: the [negative, positive] batch).
The text encoders run once per prompt and are left out.  "Direct" is the base stage's UNet run at the final size
with the base's steps and guidance.

    python benchmarks/cascade_cost.py                       # the tiny and default cascades at their own sizes
                                                            # and at Imagen's 64 -> 256 -> 1024
    python benchmarks/cascade_cost.py --cascade DIR_OR_FILES [--steps 30,20,20] [--cfg 5,4,4]   # stage files
"""

from __future__ import annotations

import argparse

from xldm.config import CASCADES
from xldm.reproduce.cost import (  # noqa: F401  (the cost model lives in the package; re-exported for callers)
    IMAGEN_SIZES, CascadeCost, StageCost, cascade_cost, files_cost, format_cost_table, format_side_by_side,
    latent_model_cost, rescaled, unet_flops, vae_decode_flops,
)


def main(argv: list[str] | None = None) -> None:
    from xldm.generate_cli import number_list
    from xldm.config import DEFAULT_BASE, DEFAULT_REFINER

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cascade", default=None, metavar="DIR_OR_FILES",
                        help="the cost of these stage files (a folder, comma-separated files, or 'default')")
    parser.add_argument("--steps", type=number_list(int), default=None, metavar="N,N,N")
    parser.add_argument("--cfg", type=number_list(float), default=None, metavar="G,G,G")
    args = parser.parse_args(argv)
    if args.cascade is not None:
        print(format_cost_table(files_cost(args.cascade, args.steps, args.cfg)))
        return
    print("the default cascade (32 -> 64 -> 128) and the default latent model (base + refiner) at 128x128, "
          "default settings")
    print(format_side_by_side(cascade_cost(CASCADES["cascade-small"]),
                              latent_model_cost(DEFAULT_BASE, DEFAULT_REFINER, (128, 128))))
    print()
    for name, configs in CASCADES.items():
        print(format_cost_table(cascade_cost(configs), title=f"{name} at its own sizes"))
        print()
        imagen = cascade_cost(configs, sizes=IMAGEN_SIZES)
        print(format_cost_table(imagen, title=f"{name} at Imagen's 64 -> 256 -> 1024"))
        print()


__all__ = ["unet_flops", "StageCost", "CascadeCost", "cascade_cost", "rescaled", "format_cost_table", "files_cost",
           "IMAGEN_SIZES", "vae_decode_flops", "latent_model_cost", "format_side_by_side"]

if __name__ == "__main__":
    main()
