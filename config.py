"""
Configuration and user errors for every script (nanoGPT's configurator, without its silent typos).

    python train_encoder.py configs/ml100k.py --seed=2 --max_steps=500

A script's keys are a dict of defaults. A config file is plain Python that sets some of them;
--key=value overrides them on the command line. A key the script does not have is an error naming
it; --help lists every key.

UserError is what a user can fix: a bad config value, a missing file, data that does not fit a
checkpoint. Library code raises it with a clear message; a script's entry point (cli) prints that
message as one line. Anything else is a bug and keeps its traceback. This module needs only the
standard library (data preparation has no torch).
"""
import ast
import difflib
import sys
import types


class UserError(Exception):
    """An error the user can fix, reported as one line by cli()."""


def cli(main):
    """Run a script's main(sys.argv[1:]); a UserError ends the process with its message, one line,
    exit code 1."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        raise SystemExit(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def coerce(key, value, default):
    """Type-check an override against its default: int->float is fine, None is fine, else the types
    must match."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise UserError(f"config: '{key}' expects True/False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)  # e.g. --out_dir=2024 parses as an int
    if type(value) is not type(default):
        raise UserError(f"config: '{key}' expects {type(default).__name__}, got {value!r}")
    return value


def unknown_key(key, known, where):
    hint = difflib.get_close_matches(key, known, n=1)
    return UserError(f"config: unknown key '{key}' in {where}"
                     + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def usage(defaults, doc):
    """What --help prints: the script's docstring, then every key with its default."""
    width = max(map(len, defaults)) + 2
    keys = "\n".join(f"  --{k:<{width}s} {v!r}" for k, v in defaults.items())
    head = "usage: [config.py] [--key=value ...]; keys and defaults:"
    return f"{(doc or '').strip()}\n\n{head}\n{keys}"


def run_config_file(path):
    """Execute a plain-Python config file; an error in it is one line naming the file and line."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"config: cannot read config file {path}: {e.strerror or e}")
    scope = {}
    try:
        exec(compile(text, path, "exec"), scope)  # plain Python, trusted as the scripts are
    except SyntaxError as e:
        raise UserError(f"config: {path}:{e.lineno}: {e.msg}")
    except Exception as e:  # e.g. a NameError: the line is the innermost frame that ran the file
        tb = e.__traceback__
        while tb.tb_next is not None and tb.tb_next.tb_frame.f_code.co_filename == path:
            tb = tb.tb_next
        line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else "?"
        raise UserError(f"config: {path}:{line}: {type(e).__name__}: {e}")
    return scope


def configure(defaults, argv, doc=None):
    """defaults: every key a script accepts. argv: [config.py] [--key=value ...], or --help / -h
    (print the script's doc and its keys, then exit). Returns a namespace."""
    cfg, args = dict(defaults), list(argv)
    if "--help" in args or "-h" in args:
        print(usage(defaults, doc))
        raise SystemExit(0)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        for key, value in run_config_file(path).items():
            if key.startswith("_") or isinstance(value, types.ModuleType):
                continue
            if key not in cfg:
                raise unknown_key(key, cfg, path)
            cfg[key] = coerce(key, value, defaults[key])
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"config: expected --key=value, got '{arg}'")
        key, text = arg[2:].split("=", 1)
        if key not in cfg:
            raise unknown_key(key, cfg, "the command line")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as --dataset=ml20m
        cfg[key] = coerce(key, value, defaults[key])
    return types.SimpleNamespace(**cfg)
