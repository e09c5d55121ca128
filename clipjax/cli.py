"""What the command-line tools share: they print their own output only, unless `--verbose`.

By default the start-up chatter of the libraries underneath is hidden: TensorFlow's and XLA's
C++ log lines (CPU feature notes, "Unable to initialize backend", the oneDNN note), their Python
INFO logs and PIL's image warnings. `--verbose` shows all of them and the tools' INFO logs. Call
`setup_logging` before TensorFlow is imported (TF_CPP_MIN_LOG_LEVEL is read at its import).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
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


# What TensorFlow's C++ code writes to stderr before absl's logging is initialised: absl's notice
# and glog-style lines ("I0000 00:00:17... port.cc:153] oneDNN custom operations are on ...", on
# CPUs where oneDNN is on by default), which TF_CPP_MIN_LOG_LEVEL does not reach.
_ABSL_PREINIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"
_GLOG_LINE = re.compile(r"^([IWEF])\d{4} ")
_GLOG_LEVELS = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3 hides the levels before its index


def filter_preinit_log(text: str, min_level: int) -> str:
    """`text` less absl's pre-initialisation notice and the glog lines below `min_level`
    (TF_CPP_MIN_LOG_LEVEL's meaning); every other line is kept as it was."""
    kept = []
    for line in text.splitlines(keepends=True):
        if line.startswith(_ABSL_PREINIT_NOTICE):
            continue
        match = _GLOG_LINE.match(line)
        if match and _GLOG_LEVELS.index(match.group(1)) < min_level:
            continue
        kept.append(line)
    return "".join(kept)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `tensorflow` with stderr (the file descriptor, where C++ writes) sent to a
    temporary file, then writes back what `filter_preinit_log` keeps. Only the import itself is
    captured; TensorFlow is still imported lazily, where it is first needed."""

    def __init__(self, min_level: int):
        self.min_level = min_level
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow" or self._loader is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self._loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                text = captured.read().decode("utf-8", "replace")
                sys.stderr.write(filter_preinit_log(text, self.min_level))
                sys.stderr.flush()


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the libraries' start-up lines and warnings unless `verbose` (environment, loggers,
    warning filters and TensorFlow's import; safe to call more than once)."""
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING lines
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        min_level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"] or 0)
        sys.meta_path.insert(0, _QuietTensorFlowImport(min_level))
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


def override_keys(argv: list[str]) -> list[str]:
    """The dotted keys of the `--config.KEY[=VALUE]` overrides in `argv`."""
    keys = []
    for arg in argv[1:]:
        if arg == "--":
            break
        m = re.match(r"--?config\.([^=\s]+)", arg)
        if m:
            keys.append(m.group(1))
    return keys


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (for `app.run(flags_parser=...)`), except that an error raised by a
    config file's get_config (e.g. an unknown :ARG key) or by an override of a key the trainer
    does not read is printed as one line, not as the traceback absl embeds."""
    from absl import app, flags

    from clipjax.train.config import key_known, unknown_key_message

    unknown = [k for k in override_keys(argv) if not key_known(k)]
    if unknown:
        print(f"error: {unknown_key_message(unknown, where='--config.')}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # a known key the experiment's config lacks
        keys = ", ".join(f"--config.{k}" for k in override_keys(argv))
        print(
            f"error: {keys}: not in the experiment's config ({e}); set new keys in the "
            "experiment file (under config.extra for the experiment's own values)",
            file=sys.stderr,
        )
        sys.exit(2)
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" not in text:
            return app.parse_flags_with_usage(argv)  # absl's own message and exit
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        print(f"error: --config: {last.split(': ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
