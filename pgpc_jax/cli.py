"""Flag parsing shared by the command-line entry points.

`app.run(main, flags_parser=parse_flags)` turns a mistyped `--config.x.y=...` override (which
ml_collections reports as a bare AttributeError deep in its parser) into one line naming the key
and listing the valid keys at that level, and exits with status 2.

`--config` is a path relative to the working directory. A value that is no file there but names a
config shipped with the package (`gta2cs`, `gta2cs.py` or `configs/gta2cs.py`, each with an
optional `:METHOD`) reads the installed `configs/` file, so the commands work outside a clone.
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


# The `configs` package installs beside `pgpc_jax` (site-packages, or the root of a clone).
SHIPPED_CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


def shipped_configs() -> list[str]:
    """File names of the configs shipped with the package (`gta2cs.py`, ...)."""
    names = glob.glob(os.path.join(SHIPPED_CONFIGS_DIR, "*.py"))
    return sorted(n for n in map(os.path.basename, names) if n != "__init__.py")


def resolve_config(spec: str) -> str:
    """`spec` (`path[:arg]`) with `path` replaced by the shipped config's file when `path` is no
    file but names one: `gta2cs`, `gta2cs.py`, `configs/gta2cs.py`. Anything else is unchanged."""
    path, sep, arg = spec.partition(":")
    if not path or os.path.isfile(path):
        return spec
    head, name = os.path.split(os.path.normpath(path))
    if head not in ("", "configs"):
        return spec
    name = name if name.endswith(".py") else name + ".py"
    if name not in shipped_configs():
        return spec
    return os.path.join(SHIPPED_CONFIGS_DIR, name) + sep + arg


def resolve_config_argument(argv: list[str]) -> list[str]:
    """`argv` with its `--config` value resolved by `resolve_config`, before absl reads it."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            argv[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
            break
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_config(argv[i + 1])
            break
    return argv


def load_config(spec: str):
    """The config of `path[:arg]`, as `--config` reads it (`configs/gta2cs.py:daformer` calls
    `get_config('daformer')`; a shipped config also by name, `gta2cs:daformer`), for scripts that
    take a config file outside absl flags."""
    from ml_collections import config_flags

    path, sep, arg = resolve_config(spec).partition(":")
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
    folder = os.path.dirname(file) or "."
    here = sorted(glob.glob(os.path.join(folder, "*.py")))
    hint = f"; there: {', '.join(os.path.basename(p) for p in here)}" if here else ""
    # In a clone, `configs/` is the shipped folder: listed once.
    if not (os.path.isdir(folder) and os.path.samefile(folder, SHIPPED_CONFIGS_DIR)):
        shipped = ", ".join(shipped_configs())
        hint += f"; shipped configs (by name, e.g. --config gta2cs.py:daformer): {shipped}"
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


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml")


def _asks_for_help(argv: list[str]) -> bool:
    """Whether `argv` holds absl's `--help` (`-?`, `--helpshort`, `--helpfull`, `--helpxml`)."""
    for arg in argv[1:]:
        if arg == "--":
            break
        name, _, value = arg.lstrip("-").partition("=")
        if (
            arg.startswith("-")
            and name in (*_HELP_FLAGS, "?")
            and value.lower() not in ("0", "false")
        ):
            return True
    return False


def _adopt_console_script_help(argv: list[str]) -> None:
    """Under a console script (`pgpc-train`), `--help` shows the entry module's docstring and
    flags, as `python -m pgpc_jax.main --help` does: absl takes both from `__main__`, which here
    is the generated wrapper and has neither."""
    main = sys.modules.get("__main__")
    if main is None or main.__doc__ or getattr(main, "__spec__", None) is not None:
        return  # `python -m MODULE`: absl finds them itself
    if not _asks_for_help(argv):
        return
    from importlib import metadata

    name = os.path.basename(sys.argv[0])
    for entry in metadata.entry_points(group="console_scripts", name=name):
        module = sys.modules.get(entry.module)
        if module is None:
            continue
        main.__doc__ = module.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
        return


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with readable errors for bad flags and config overrides; a shipped config
    may be named instead of a path (`--config gta2cs.py:daformer`); `--help` exits with status 0
    (absl: 1) and shows the program's flags under its console script too."""
    argv = resolve_config_argument(argv)
    _adopt_console_script_help(argv)
    message = _missing_config(argv) or _bad_config_argument(argv)
    if message is None:
        try:
            return flags.FLAGS(argv)
        except SystemExit as e:
            if e.code == 1 and _asks_for_help(argv):  # absl printed the help asked for: a success
                sys.exit(0)
            raise
        except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
            message = _bad_override(argv) or f"{type(e).__name__}: {e}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
