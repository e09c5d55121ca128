"""`python -m clipjax.models`: list the presets with parameter counts
(computed without allocating)."""

from __future__ import annotations

import argparse
import dataclasses

from clipjax.models import PRESETS, num_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipjax.models", description=__doc__)
    parser.add_argument("names", nargs="*", help="presets to show (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {list(PRESETS)}")
    print(f"{'preset':<8} {'params':>13}  {'image':>5}  {'tower':<24} {'text':<18} {'embed':>5}")
    for name in args.names or PRESETS:
        cfg = PRESETS[name]
        # Scanning the layers makes tracing much cheaper; it does not change the count.
        n = num_params(dataclasses.replace(cfg, scan_layers=True))
        if cfg.vision_type == "vit":
            tower = f"ViT p{cfg.patch_size} w{cfg.vision_width} x{cfg.vision_layers}"
        else:
            tower = f"ResNet{list(cfg.vision_layers)} w{cfg.vision_width}"
        text = f"w{cfg.text_width} x{cfg.text_layers} L{cfg.context_length}"
        print(f"{name:<8} {n:>13,}  {cfg.image_size:>5}  {tower:<24} {text:<18} {cfg.embed_dim:>5}")


if __name__ == "__main__":
    main()
