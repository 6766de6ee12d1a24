"""The `catalog-embed` command line: parses arguments into config dataclasses and hands them to a job.

Each subcommand lives in its own module under `pipelines/` and exposes `register(subparsers)`, which adds its
parser and sets `handler` to a function taking the parsed namespace and returning an exit code.

Exit codes: 0 on success; an error's own `exit_code` (`catalog_embed.schemas.errors`), printed as one line
`catalog-embed: error: ...`, never a traceback: 2 for an error the user can fix, 1 for a run aborted as broken, 75
(EX_TEMPFAIL) for a run that stopped resumable (run again); 130 when interrupted (Ctrl-C) and 143 when terminated
(SIGTERM), both without a traceback. A command may use 1 for a result of its own (`compare`: the gate failed).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
import threading
from importlib.metadata import version
from pathlib import Path
from typing import NoReturn

from catalog_embed.pipelines import logs
from catalog_embed.schemas.errors import CatalogEmbedError, ConfigError, MissingExtraError, first_line
from catalog_embed.workers.transient import storage_unavailable, unavailable_error

# Modules providing subcommands, in the order `--help` lists them.
_COMMAND_MODULES = (
    "catalog_embed.pipelines.embed.job",
    "catalog_embed.pipelines.analysts.query",
    "catalog_embed.pipelines.embed.vacuum",
    "catalog_embed.pipelines.embed.maintain",
    "catalog_embed.pipelines.models",
    "catalog_embed.pipelines.demo",
    "catalog_embed.pipelines.probes.cli",
    "catalog_embed.pipelines.analysts.similar",
    "catalog_embed.pipelines.analysts.index",
    "catalog_embed.pipelines.analysts.map",
    "catalog_embed.pipelines.analysts.compare",
)

# Top-level modules of the optional dependencies (pyproject.toml) -> the extra that installs them.
EXTRAS = {
    "apache_beam": "beam",
    "ray": "ray",
    "sklearn": "probe",
    "mir_eval": "probe",
    "matplotlib": "probe",
    "gcsfs": "gcs",
    "s3fs": "s3",
    "h5py": "mule",
    "onnxruntime": "onnx",
    "pretty_midi": "demo",
    "tinysoundfont": "demo",
    "transformers": "hf",
    "huggingface_hub": "hf",
    "yaml": "hf",
}

# Subcommand -> the option naming the local folder it writes into, checked before any work.
_WRITES_INTO = {"embed": "out", "tag": "out", "probe": "out", "vacuum": "out"}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process Ctrl-C ended
EXIT_TERMINATED = 143  # 128 + SIGTERM


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, [], "", argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose subcommands (built with this class too) show defaults in `--help`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Report a command-line mistake in one line, like every other error the user can fix."""
        self.exit(EXIT_USER_ERROR, f"catalog-embed: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = ArgumentParser(
        prog="catalog-embed",
        description="Turn a music catalog into embeddings: decode, log-mel, frozen encoder, Delta tables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('catalog-embed')}")
    logs.add_logging_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops as it does on Ctrl-C: cleanly, resumable."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    # deltalake's errors carry a Rust backtrace when RUST_BACKTRACE is set (as on many machines): not in our output.
    os.environ.setdefault("RUST_LIB_BACKTRACE", "0")
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    # A blocked signal mask is inherited: a process started with SIGINT and SIGTERM blocked (Ray starts its
    # processes so, and their children inherit it) would never see a Ctrl-C or a stop and run on to the end.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    command = args = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        logs.configure(args.log_level, args.log_format)
        _check_output_folder(args)
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as exc:
        logs.say("catalog-embed: interrupted; run again to resume")
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except CatalogEmbedError as exc:
        return _error(exc)
    except ImportError as exc:
        missing = missing_extra(exc, command)
        if missing is None:
            raise
        return _error(missing)
    except BrokenPipeError:
        # The reader went away (`| head`): what it wanted was printed. Python would report the failed flush of
        # stdout at exit; point stdout at /dev/null so it does not.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        # A store that kept failing past every retry is not a bug: one line and exit 75, whichever command read it.
        if storage_unavailable(exc):
            return _error(unavailable_error(f"running `{command}`", exc))
        message = _os_error_message(exc, args) if isinstance(exc, OSError) else _credentials_message(exc)
        if message is None:
            raise
        return _error(message)


# Object-store clients' "no credentials" errors, by (module, class), and what to set: the clients are optional
# extras, so they are recognised by name rather than imported here.
_CREDENTIAL_ERRORS = {
    ("botocore.exceptions", "NoCredentialsError"): "S3",
    ("botocore.exceptions", "PartialCredentialsError"): "S3",
    ("google.auth.exceptions", "DefaultCredentialsError"): "GCS",
}
_CREDENTIAL_FIXES = {
    "S3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give them with --storage-option",
    "GCS": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run `gcloud auth "
    "application-default login`",
}


def _credentials_message(exc: Exception) -> str | None:
    """One line for an object store that refused for want of credentials; None for any other error."""
    store = _CREDENTIAL_ERRORS.get((type(exc).__module__, type(exc).__name__))
    if store is None:
        return None
    return f"{store} credentials not found ({first_line(exc)}): {_CREDENTIAL_FIXES[store]}"


# errno -> what it means and what to do; the codes a user fixes on their side (space, permissions, mounts).
_FIXABLE_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or pass a path on another disk, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or pass a path on another disk, then run again"),
    errno.EACCES: ("permission denied", "run as a user allowed to use it, or pass a path this user can write"),
    errno.EPERM: ("operation not permitted", "run as a user allowed to use it, or pass a path this user can write"),
    errno.EROFS: ("read-only file system", "pass a path on a writable file system"),
}
# pyarrow and deltalake raise OSErrors without `errno` or `filename`: the message says "[errno 28]" or "(os error
# 28)", and pyarrow quotes the path ("Failed to open local file '/x/y.csv'").
_ERRNO_IN_MESSAGE = re.compile(r"(?:os error|errno) (\d+)", re.IGNORECASE)
_PATH_IN_MESSAGE = re.compile(r"'([^']+)'")


def _os_error_message(exc: OSError, args: argparse.Namespace | None) -> str | None:
    """One line for an OSError the user fixes on their side (disk full, no permission, read-only mount), naming
    the path and the fix; None for any other OSError (a bug, shown with its traceback)."""
    code = exc.errno
    if code is None and (found := _ERRNO_IN_MESSAGE.search(str(exc))):
        code = int(found.group(1))
    if code not in _FIXABLE_OS_ERRORS:
        return None
    what, fix = _FIXABLE_OS_ERRORS[code]
    path = exc.filename
    if path is None and (quoted := _PATH_IN_MESSAGE.search(str(exc))):
        path = quoted.group(1)
    if path is None and args is not None and (option := _WRITES_INTO.get(args.command)):
        path = getattr(args, option, None)  # deltalake names no file: the folder the command writes into
    return f"{os.fsdecode(path)}: {what}: {fix}" if path is not None else f"{what}: {fix}"


def _error(exc: CatalogEmbedError | str) -> int:
    """Print one line for a named error (its own exit code) or an OS condition the user fixes (exit 2)."""
    message = " ".join(str(exc).split("\n"))
    logs.say(f"catalog-embed: error: {message}")
    return exc.exit_code if isinstance(exc, CatalogEmbedError) else EXIT_USER_ERROR


def missing_extra(exc: ImportError, command: str | None = None) -> MissingExtraError | None:
    """The error naming the extra to install when `exc` (or what caused it) is a missing optional dependency."""
    seen: Exception | None = exc
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            root = seen.name.partition(".")[0]
            if root in EXTRAS:
                extra = EXTRAS[root]
                needs = f"`{command}`" if command else "this command"
                msg = (
                    f"{needs} needs the [{extra}] extra (module {root!r} is not installed): "
                    f"pip install 'catalog-embed[{extra}]'"
                )
                return MissingExtraError(msg)
        seen = seen.__cause__ or seen.__context__
    return None


def _check_output_folder(args: argparse.Namespace) -> None:
    """Refuse a local output that is a file or cannot be written, before any work (remote URIs pass through)."""
    option = _WRITES_INTO.get(args.command)
    value = getattr(args, option, None) if option else None
    if not value or "://" in value and not value.startswith("file://"):
        return
    path = Path(value.removeprefix("file://"))
    flag = f"--{option.replace('_', '-')}"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        msg = f"{flag} {value!r}: {existing} is a file, not a folder: pass a folder (it is created when missing)"
        raise ConfigError(msg)
    if not os.access(existing, os.W_OK | os.X_OK):
        msg = f"{flag} {value!r} cannot be written ({existing} is read-only for this user): pass a writable folder"
        raise ConfigError(msg)


if __name__ == "__main__":
    sys.exit(main())
