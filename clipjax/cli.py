"""What the command-line tools share: they print their own output only, unless `--verbose`.

By default the start-up chatter of the libraries underneath is hidden: TensorFlow's and XLA's
C++ log lines (CPU feature notes, "Unable to initialize backend"), their Python INFO logs and
PIL's image warnings. `--verbose` shows all of them and the tools' INFO logs. Call
`setup_logging` before TensorFlow is imported (TF_CPP_MIN_LOG_LEVEL is read at its import).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

VERBOSE_HELP = "also show the libraries' start-up and INFO logs (TensorFlow, JAX, absl, PIL)"
# Loggers of libraries whose INFO lines are start-up chatter, not the tool's output.
LIBRARY_LOGGERS = ("absl", "jax", "jaxlib", "tensorflow", "orbax", "PIL", "etils", "h5py")
FORMAT = "%(levelname)s %(name)s: %(message)s"
# Errors that mean bad input (a path, a file's contents, an argument): the CLIs print them as one
# `error:` line and exit 1 instead of a traceback.
INPUT_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    ValueError,
    KeyError,
    ImportError,
    NotImplementedError,
)


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the libraries' start-up lines and warnings unless `verbose` (environment, loggers
    and warning filters only; safe to call more than once)."""
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING lines
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


def setup_logging(verbose: bool = False, level: int = logging.INFO) -> None:
    """The argparse CLIs' logging: the tool's own records at `level` (INFO: progress notes,
    WARNING: problems only), the libraries' quiet unless `verbose`."""
    quiet_libraries(verbose)
    logging.basicConfig(level=level, format=FORMAT)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """`--verbose` (see the module docstring) on an argparse (sub)parser."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def config_file_error(flag: str = "config") -> str | None:
    """Why the absl config-file flag `flag` cannot be used (a missing file), or None.
    ml_collections defers that error to the first use of the config, as a traceback."""
    from absl import flags
    from ml_collections import config_flags

    spec = config_flags.get_config_filename(flags.FLAGS[flag])  # PATH[:ARG]
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return (
            f"--{flag} {spec}: {path} does not exist; expected an experiment file such as "
            "experiments/demo.py (optionally with :ARG)"
        )
    return None


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (for `app.run(flags_parser=...)`), except that an error raised by a
    config file's get_config (e.g. an unknown :ARG key) is printed as one line, not as the
    traceback absl embeds."""
    from absl import app, flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" not in text:
            return app.parse_flags_with_usage(argv)  # absl's own message and exit
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        print(f"error: --config: {last.split(': ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
