"""Conventions shared by the ``edgeadapt`` and ``edgeadapt-device`` command lines.

One place for what every sub-command has in common, so that a new sub-command gets it
without code of its own:

- help texts show defaults (:class:`HelpFormatter`, applied to every sub-parser by
  :func:`apply_conventions` after registration);
- ``-v/--verbose`` and ``-q/--quiet`` on the main parser and on every sub-command; quiet
  by default (warnings and errors only), TensorFlow's C++/absl start-up logs silenced;
- progress bars only on a terminal (:func:`progress_enabled`);
- exit codes (:data:`EXIT_OK`, :data:`EXIT_ERROR`, :data:`EXIT_USAGE`) and the one-line
  ``PROG: error: ...`` message of :func:`run_main`;
- ``--json`` (a flag: JSON on stdout) and ``--json-out FILE`` (:func:`add_json_options`);
- ``--backend`` with the real list of interpreters (:func:`add_backend_option`);
- old option spellings kept as hidden, deprecated aliases (:func:`add_deprecated_alias`).

TensorFlow-free: the device command line imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeadapt.device.backends import AUTO_ORDER
from edgeadapt.device.console import filtered_native_stderr, progress_enabled, set_output_mode
from edgeadapt.device.errors import EdgeAdaptError

EXIT_OK = 0
"""The command did what it was asked."""
EXIT_ERROR = 1
"""An error in the data, the files or the environment (an :class:`EdgeAdaptError`), or a check failed."""
EXIT_USAGE = 2
"""The command line itself is wrong (unknown option, missing argument); argparse prints the usage."""

EXIT_CODES_HELP = (
    "exit status: 0 success; 1 error (one line 'PROG: error: ...' says what was wrong and what to do; "
    "-v adds the traceback) or a failed check; 2 usage error (bad or missing options)."
)

#: Values of ``--backend``: "auto" and every interpreter the device runtime knows.
BACKEND_CHOICES: tuple[str, ...] = ("auto", *AUTO_ORDER)

#: Loggers of third-party libraries that are chatty at INFO level.
NOISY_LOGGERS = ("tensorflow", "absl", "h5py", "tf2onnx", "onnx", "PIL", "jax", "matplotlib")


class HelpFormatter(argparse.HelpFormatter):
    """Help text with the default of each option, unless the text already states it.

    Flags (``store_true``) and options whose default is ``None`` show no default: there is
    nothing to state.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or isinstance(action, argparse._CountAction):
            return text
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        if isinstance(default, (list, tuple)) and not default:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text


def add_verbosity_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """Add ``-v/--verbose`` (repeatable) and ``-q/--quiet`` to ``parser``.

    Args:
        parser: The main parser or a sub-command's parser.
        top_level: True for the main parser (the options get their defaults there); False
            for sub-commands, where an unused option must not reset what the main parser read.

    Returns:
        None.
    """
    if "-v" in parser._option_string_actions or "-q" in parser._option_string_actions:
        return  # the sub-command has options of its own with these names
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0 if top_level else argparse.SUPPRESS,
                       help="more output: -v info messages and tracebacks, -vv debug and TensorFlow's own logs")
    group.add_argument("-q", "--quiet", action="store_true", default=False if top_level else argparse.SUPPRESS,
                       help="errors only: no warnings, no progress bars")


def _sub_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield child


def apply_conventions(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and every sub-parser (recursively) the shared conventions.

    Call it once, after every sub-command module registered its commands: each parser gets
    :class:`HelpFormatter` (defaults shown) and ``-v/-q``; the main parser also lists the exit
    codes. Sub-command modules need no code for this.

    Args:
        parser: The main parser, with its sub-commands registered.

    Returns:
        The same parser.
    """
    parser.formatter_class = HelpFormatter
    add_verbosity_options(parser, top_level=True)
    if not parser.epilog:
        parser.epilog = EXIT_CODES_HELP.replace("PROG", parser.prog)
    pending = list(_sub_parsers(parser))
    while pending:
        child = pending.pop()
        child.formatter_class = HelpFormatter
        add_verbosity_options(child, top_level=False)
        pending.extend(_sub_parsers(child))
    return parser


def command_parser(prog: str, description: str, command_modules: Sequence[str],
                   register: Sequence[Callable[[Any], None]] = (), version: str | None = None
                   ) -> argparse.ArgumentParser:
    """A top-level parser: its sub-commands registered, then the shared conventions applied.

    Args:
        prog: The program name shown in usage lines.
        description: What the program does (shown by ``--help``).
        command_modules: Modules whose ``register(subparsers)`` add sub-commands (imported here, in order).
        register: Functions ``register(subparsers)`` called before the modules (sub-commands defined
            beside the entry point).
        version: Shown by ``--version`` when given.

    Returns:
        The parser; each sub-command sets ``handler`` (run by :func:`run_main`).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if version is not None:
        parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for function in register:
        function(subparsers)
    for module_name in command_modules:
        importlib.import_module(module_name).register(subparsers)
    return apply_conventions(parser)


def add_backend_option(parser: argparse.ArgumentParser, help_text: str = "interpreter that runs the backbone; "
                       "auto takes the first installed of " + ", ".join(AUTO_ORDER), dest: str = "backend",
                       flag: str = "--backend") -> None:
    """Add ``--backend`` with ``choices`` from the device runtime's list of interpreters.

    Args:
        parser: The sub-command's parser.
        help_text: The option's help text.
        dest: Attribute name in the parsed arguments.
        flag: The option's name.

    Returns:
        None.
    """
    parser.add_argument(flag, dest=dest, choices=BACKEND_CHOICES, default="auto", help=help_text)


def add_json_options(parser: argparse.ArgumentParser, what: str = "the report") -> None:
    """Add ``--json`` (print JSON on stdout instead of text) and ``--json-out FILE``.

    Args:
        parser: The sub-command's parser.
        what: What the JSON holds, for the help texts.

    Returns:
        None.
    """
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout instead of text")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help=f"also write {what} as JSON to FILE")


def emit_report(arguments: argparse.Namespace, text: str, data: Any) -> None:
    """Print ``text`` (or ``data`` as JSON with ``--json``) and write ``--json-out`` if given.

    Args:
        arguments: Parsed arguments with ``json`` and ``json_out`` (see :func:`add_json_options`).
        text: The human-readable report.
        data: The same report as JSON-serialisable data.

    Returns:
        None.
    """
    document = json.dumps(data, indent=2)
    print(document if getattr(arguments, "json", False) else text)
    json_out = getattr(arguments, "json_out", None)
    if json_out is not None:
        Path(json_out).write_text(document + "\n")


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str = "", **kwargs: Any) -> None:
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, replacement: str, dest: str,
                         type: Callable[[str], Any] | None = None) -> None:
    """Keep an old option spelling working, hidden from ``--help``, with a warning when used.

    Args:
        parser: The sub-command's parser.
        old: The old option, e.g. ``"--size"``.
        replacement: The option to use instead, e.g. ``"--image-size"`` (same ``dest``).
        dest: Attribute name shared with ``replacement``.
        type: Converter of the value, the same as ``replacement``'s.

    Returns:
        None.
    """
    parser.add_argument(old, dest=dest, type=type, action=_DeprecatedAlias, replacement=replacement,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def parse_image_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``"128x96"``: height 128, width 96) or ``"N"`` (square).

    Args:
        text: The option's value.

    Returns:
        ``(height, width)``.

    Raises:
        argparse.ArgumentTypeError: When the text is not one or two positive numbers.
    """
    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be HxW (e.g. 128x128) or one number, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"image size must be HxW with positive numbers, got {text!r}")
    return values[0], values[1]


# ----------------------------------------------------------------------------- output
def verbosity_of(arguments: argparse.Namespace) -> int:
    """-1 with ``-q``, 0 by default, 1 with ``-v``, 2 with ``-vv``.

    Args:
        arguments: Parsed arguments.

    Returns:
        The verbosity level.
    """
    if getattr(arguments, "quiet", False):
        return -1
    return min(int(getattr(arguments, "verbose", 0) or 0), 2)


def keras_verbosity(verbosity: int) -> int:
    """Keras ``verbose`` for training: a bar on a terminal, one line per epoch with ``-v``, else nothing.

    Args:
        verbosity: See :func:`verbosity_of`.

    Returns:
        0, 1 or 2 as Keras' ``fit(verbose=...)`` takes it.
    """
    if verbosity >= 1:
        return 2
    return 1 if verbosity == 0 and progress_enabled(sys.stdout) else 0


def configure_output(verbosity: int) -> None:
    """Set log levels and TensorFlow's native log level for a command-line run.

    Quiet by default: warnings and errors (``-q``: errors only). TensorFlow's C++ logs are
    silenced (``TF_CPP_MIN_LOG_LEVEL=3`` unless the environment already sets it, or ``-vv``).
    Must run before TensorFlow is imported.

    Args:
        verbosity: See :func:`verbosity_of`.

    Returns:
        None.
    """
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[verbosity]
    set_output_mode(quiet=verbosity < 0, native_logs=verbosity >= 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if verbosity < 2:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "absl.logging" in sys.modules or _module_available("absl.logging"):
        import absl.logging

        absl.logging.set_verbosity(absl.logging.DEBUG if verbosity >= 2 else absl.logging.ERROR)


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _QuietLoader(importlib.abc.Loader):
    """Wraps a module's loader so that executing the module runs inside :func:`filtered_native_stderr`."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            with filtered_native_stderr():
                self._loader.exec_module(module)
        finally:  # the module keeps its real loader (importlib.resources and friends ask it)
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Import hook: the first ``import tensorflow`` runs with its native start-up logs filtered.

    Installed by :func:`run_main` at the default verbosity; it removes itself once used.
    """

    modules = ("tensorflow",)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.modules:
            return None
        self.uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec

    def install(self) -> None:
        if self not in sys.meta_path and not any(name in sys.modules for name in self.modules):
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


def error_line(prog: str, error: BaseException) -> str:
    """The one-line error message: ``PROG: error: what was wrong and what to do``.

    Args:
        prog: The program name.
        error: The error.

    Returns:
        The message, its lines joined with "; ".
    """
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{prog}: error: {text or type(error).__name__}"


def run_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run the chosen sub-command's handler and map the outcome to an exit code.

    Args:
        parser: The main parser (after :func:`apply_conventions`); sub-commands set ``handler``.
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        :data:`EXIT_OK`, the handler's own non-zero status (a failed check), or
        :data:`EXIT_ERROR` after an :class:`EdgeAdaptError` (one line on stderr; the
        traceback too with ``-v``).

    Raises:
        SystemExit: With :data:`EXIT_USAGE` for a bad command line, or 0 after ``--help``.
    """
    arguments = parser.parse_args(argv)
    verbosity = verbosity_of(arguments)
    configure_output(verbosity)
    hook = QuietTensorFlowImport()
    if verbosity < 2:
        hook.install()
    try:
        return int(arguments.handler(arguments) or EXIT_OK)
    except EdgeAdaptError as error:
        if verbosity >= 1:
            traceback.print_exc()
        print(error_line(parser.prog, error), file=sys.stderr)
        return EXIT_ERROR
    finally:
        hook.uninstall()
