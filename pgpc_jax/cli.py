"""Flag parsing shared by the command-line entry points.

`app.run(main, flags_parser=parse_flags)` turns a mistyped `--config.x.y=...` override (which
ml_collections reports as a bare AttributeError deep in its parser) into one line naming the key
and listing the valid keys at that level, and exits with status 2.
"""

from __future__ import annotations

import glob
import os
import sys

from absl import flags


def _config_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(spec: str):
    """The config of `path[:arg]`, as `--config` reads it (`configs/gta2cs.py:daformer` calls
    `get_config('daformer')`), for scripts that take a config file outside absl flags."""
    from ml_collections import config_flags

    path, sep, arg = spec.partition(":")
    module = config_flags.config_flags._LoadConfigModule("config", path)
    return module.get_config(arg) if sep else module.get_config()


def _bad_override(argv: list[str]) -> str | None:
    """Describe the first `--config.` override whose key path does not exist."""
    path = _config_file(argv)
    if path is None:
        return None
    try:
        config = load_config(path)
    except Exception:  # the file itself is broken: let the original error speak
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        keys = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(keys):
            if not hasattr(node, "keys") or key not in node:
                where = ".".join(["config", *keys[:depth]])
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
                return f"--config.{'.'.join(keys)}: {where} has no key {key!r}. Valid keys: {valid}"
            node = node[key]
    return None


def _missing_config(argv: list[str]) -> str | None:
    """Describe a `--config` file that does not exist (ml_collections would only fail later,
    with a traceback, when the config is first used)."""
    path = _config_file(argv)
    if path is None:
        return None
    file = path.split(":", 1)[0]  # `configs/x.py:arg` passes `arg` to get_config
    if os.path.isfile(file):
        return None
    here = sorted(glob.glob(os.path.join(os.path.dirname(file) or ".", "*.py")))
    hint = f"; there: {', '.join(os.path.basename(p) for p in here)}" if here else ""
    return f"--config={path}: no such file{hint}"


def _bad_config_argument(argv: list[str]) -> str | None:
    """Describe a config whose `get_config` refuses its argument (`configs/gta2cs.py:sepico`
    before SePiCo exists): ml_collections reports it as a traceback inside its own message."""
    path = _config_file(argv)
    if path is None:
        return None
    try:
        load_config(path)
    except ValueError as e:
        return f"--config={path}: {e}"
    except Exception:  # a broken file: let the original error speak
        return None
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with readable errors for bad flags and config overrides."""
    message = _missing_config(argv) or _bad_config_argument(argv)
    if message is None:
        try:
            return flags.FLAGS(argv)
        except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
            message = _bad_override(argv) or f"{type(e).__name__}: {e}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
