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


def at_least(lo):
    """A rule for configure(): the value (each value, for a tuple) is >= lo."""
    return f">= {lo}", lambda x: x >= lo


def fraction(upper_open=True):
    """A rule: 0 <= value < 1 (a probability such as dropout), or 0 < value <= 1."""
    if upper_open:
        return "in [0, 1)", lambda x: 0 <= x < 1
    return "in (0, 1]", lambda x: 0 < x <= 1


def one_of(*choices):
    """A rule: the value is one of the choices."""
    return "one of " + ", ".join(map(repr, choices)), lambda x: x in choices


def check(cfg, rules):
    """Every key with a rule holds a value the rule allows, or a UserError names the key, its value
    and the allowed range: checked with the config, before any work or any write."""
    for key, (allowed, ok) in rules.items():
        value = getattr(cfg, key)
        if not all(ok(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise UserError(f"config: {key}={value!r} is not allowed: it must be {allowed}")


def configure(defaults, argv, doc=None, rules=None):
    """defaults: every key a script accepts. argv: [config.py] [--key=value ...], or --help / -h
    (print the script's doc and its keys, then exit). rules: {key: rule} (at_least, fraction,
    one_of), checked last. Returns a namespace."""
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
    cfg = types.SimpleNamespace(**cfg)
    check(cfg, rules or {})
    return cfg
