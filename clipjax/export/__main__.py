"""Export / import model weights.

  python -m clipjax.export --workdir DIR [--step N] --out OUT --format safetensors|msgpack|hf|openai
  python -m clipjax.export --model PATH --out OUT --format ...
  python -m clipjax.export import --from hf|openai|open_clip SRC --out DIR [--format msgpack]
  python -m clipjax.export interpolate A B --alpha 0.5 --out DIR [--format msgpack]

Formats: safetensors / msgpack write a clipjax model directory; hf a Hugging Face CLIP directory
(config.json, flax_model.msgpack, model.safetensors); openai one .safetensors state dict with
OpenAI CLIP names (what open_clip loads). Output directories appear whole or not at all;
--overwrite replaces only a model directory (or an empty one), by swapping a complete new one in.
`interpolate` writes the clipjax model dir (1 - alpha) * A + alpha * B (WiSE-FT) with A's config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from clipjax.cli import INPUT_ERRORS, add_verbose_flag, setup_logging
from clipjax.files import check_replaceable, write_dir_atomically

EXPORT_FORMATS = ("safetensors", "msgpack", "hf", "openai")
IMPORT_SOURCES = ("hf", "openai", "open_clip")


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.export",
        description="Export a trained or loaded model (see also: python -m clipjax.export "
        "import --help).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (latest complete checkpoint)")
    src.add_argument("--model", help="any model clipjax can load (model dir, HF dir, state dict)")
    p.add_argument("--step", type=int, help="checkpoint step (with --workdir); default latest")
    p.add_argument("--out", required=True, help="output directory (.safetensors file for openai)")
    p.add_argument("--format", default="safetensors", choices=EXPORT_FORMATS)
    p.add_argument(
        "--drop-logit-bias",
        action="store_true",
        help="hf: export a model with a logit bias without it (HF CLIP has none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_trust_flag(p)
    add_verbose_flag(p)
    return p


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.export import",
        description="Convert Hugging Face / OpenAI / open_clip weights to a clipjax model dir.",
    )
    p.add_argument("--from", dest="source", required=True, choices=IMPORT_SOURCES)
    p.add_argument("src", help="HF CLIP directory, or a .safetensors/.pt state dict")
    p.add_argument("--out", required=True, help="output clipjax model directory")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "msgpack"))
    p.add_argument(
        "--act",
        choices=("quick_gelu", "gelu"),
        help="openai/open_clip activation (default: quick_gelu for openai, gelu for "
        "open_clip; open_clip's '-quickgelu' models need quick_gelu)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_trust_flag(p)
    add_verbose_flag(p)
    return p


def interpolate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.export interpolate",
        description="Weight-space interpolation (WiSE-FT) of two models of the same "
        "architecture: writes the clipjax model dir (1 - alpha) * A + alpha * B with A's config.",
    )
    p.add_argument("a", help="model A (any model clipjax can load; its config is kept)")
    p.add_argument("b", help="model B (same architecture as A)")
    p.add_argument("--alpha", type=float, required=True, help="weight of B, in [0, 1]")
    p.add_argument("--out", required=True, help="output clipjax model directory")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "msgpack"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_trust_flag(p)
    add_verbose_flag(p)
    return p


def run_interpolate(args: argparse.Namespace) -> None:
    from clipjax.export.interpolate import (
        check_alpha,
        check_same_architecture,
        interpolate_params,
    )
    from clipjax.export.load import load_config_and_params

    alpha = check_alpha(args.alpha)
    _check_out(args.out, args.overwrite, args.format)
    trust = args.trust_torchscript
    config_a, params_a = load_config_and_params(args.a, trust_torchscript=trust)
    config_b, params_b = load_config_and_params(args.b, trust_torchscript=trust)
    check_same_architecture(config_a, config_b, (args.a, args.b))
    params = interpolate_params(params_a, params_b, alpha)
    write_model(args.out, args.format, config_a, params)
    print(f"wrote {1 - alpha:g} * {args.a} + {alpha:g} * {args.b} to {args.out}")


def add_trust_flag(p: argparse.ArgumentParser, also: str = "") -> None:
    """--trust-torchscript, for every CLI that loads model files."""
    p.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="allow torch.jit.load for a TorchScript .pt that cannot be read as data "
        "only (it runs code stored in the file: only for files you trust)" + also,
    )


def _check_out(out: str, overwrite: bool, fmt: str) -> None:
    """Stop before any loading if --out exists and may not be replaced: without --overwrite, or
    (with it) when it is not a model directory (a folder of other files is never emptied)."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise SystemExit(f"error: --out {out} already exists; pass --overwrite to replace it")
    if fmt == "openai":
        if os.path.isdir(out):
            raise SystemExit(f"error: --out {out} is a directory; --format openai writes a file")
        return
    from clipjax.export.modeldir import is_replaceable

    try:
        check_replaceable(out, is_replaceable)
    except FileExistsError as e:
        raise SystemExit(f"error: --out {e}") from None


def write_model(out: str, fmt: str, config, params, drop_logit_bias: bool = False) -> None:
    """Write (config, params) to `out` in `fmt` (one of EXPORT_FORMATS)."""
    if fmt in ("safetensors", "msgpack"):
        from clipjax.export.modeldir import save_model_dir

        save_model_dir(out, config, params, fmt)
    elif fmt == "hf":
        from clipjax.export.hfdir import write_hf_dir
        from clipjax.export.modeldir import is_replaceable

        write_dir_atomically(
            out,
            lambda d: write_hf_dir(d, config, params, drop_logit_bias=drop_logit_bias),
            replaceable=is_replaceable,
        )
    elif fmt == "openai":
        from safetensors.numpy import save

        from clipjax.export.openai import to_openai_state_dict
        from clipjax.files import clean_stale, write_bytes

        if not out.endswith(".safetensors"):
            raise SystemExit(
                f"error: --format openai writes one file; --out must end in "
                f".safetensors (got {out})"
            )
        clean_stale(out)
        write_bytes(out, save(to_openai_state_dict(config, params)))
    else:
        raise SystemExit(f"error: unknown format {fmt!r}; expected one of {EXPORT_FORMATS}")


def run_export(args: argparse.Namespace) -> None:
    from clipjax.export.load import load_config_and_params

    if args.step is not None and args.workdir is None:
        raise SystemExit("error: --step needs --workdir")
    _check_out(args.out, args.overwrite, args.format)
    src = args.workdir or args.model
    if args.workdir is not None and not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise SystemExit(
            f"error: --workdir {args.workdir}: no checkpoints/ directory; expected "
            f"a training workdir"
        )
    config, params = load_config_and_params(
        src, step=args.step, trust_torchscript=args.trust_torchscript
    )
    write_model(args.out, args.format, config, params, drop_logit_bias=args.drop_logit_bias)
    print(f"wrote {args.format} model to {args.out}")


def run_import(args: argparse.Namespace) -> None:
    _check_out(args.out, args.overwrite, args.format)
    if args.source == "hf":
        from clipjax.export.hfdir import is_hf_dir, read_hf_dir

        if not is_hf_dir(args.src):
            raise SystemExit(
                f"error: {args.src}: not a Hugging Face CLIP directory (expected "
                f'config.json with "model_type": "clip")'
            )
        if args.act or args.trust_torchscript:
            raise SystemExit(
                "error: --act and --trust-torchscript apply to openai/open_clip imports only"
            )
        config, params = read_hf_dir(args.src)
    else:
        from clipjax.export.openai import DEFAULT_ACT, from_openai_state_dict, read_state_dict

        sd = read_state_dict(args.src, trust_torchscript=args.trust_torchscript)
        config, params = from_openai_state_dict(sd, act=args.act or DEFAULT_ACT[args.source])
    from clipjax.export.load import check_params

    check_params(config, params, where=args.src)
    write_model(args.out, args.format, config, params)
    print(
        f"imported {args.source} model {args.src} -> {args.out} "
        f"({config.vision_type}, embed_dim={config.embed_dim})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "import": (import_parser, run_import),
        "interpolate": (interpolate_parser, run_interpolate),
    }
    parser, command = commands.get(argv[0] if argv else "", (export_parser, run_export))
    args = parser().parse_args(argv[1:] if parser is not export_parser else argv)
    setup_logging(args.verbose)
    try:
        command(args)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
