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
