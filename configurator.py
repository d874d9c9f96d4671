"""
Poor man's configurator, after nanoGPT. A script defines its defaults as
module-level globals, then runs

    config = apply_config(sys.argv[1:], globals())

Every argument is either a config file (`config/shapes.py`, a Python file of
assignments) or an override `--key=value` (or `--key value`; a bare `--flag` sets a
boolean to True). Names in ALL_CAPS are constants, not config keys.
Values are parsed with ast.literal_eval (a bare word stays a string) and must
have the type of the default. A list key given bare words collects them, one per
flag: `--image a.png --image b.png` is ['a.png', 'b.png']. An unknown key or a wrong type stops the script
with one line naming the nearest valid key, before any work starts.

The returned dict is the resolved config: scripts print it and save it in checkpoints.
"""
import ast
import difflib


def _config_keys(g):
    return [k for k, v in g.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]


def _nearest(key, keys):
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _parse(raw):
    try:
        return ast.literal_eval(raw)
    except (SyntaxError, ValueError):
        return raw  # a bare word such as --device=cpu


def _check_type(key, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise SystemExit(f"config error: --{key} expects {type(default).__name__} "
                         f"(True/False or a number), got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if not isinstance(value, type(default)):
        raise SystemExit(f"config error: --{key}={value!r} has type {type(value).__name__}, "
                         f"expected {type(default).__name__} like the default {default!r}")
    return value


def apply_config(argv, g):
    """Apply config files and --key=value overrides in argv to the dict g. Returns the config.
    Also accepted: `--key value`, and a bare `--flag` for a boolean key (meaning True)."""
    keys = _config_keys(g)
    argv, collected = list(argv), set()
    while argv:
        arg = argv.pop(0)
        if not arg.startswith('--'):
            try:
                src = open(arg).read()
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file {arg}: {e.strerror}")
            fresh = {}
            exec(compile(src, arg, 'exec'), {}, fresh)
            for k, v in fresh.items():
                if k.startswith('_') or callable(v) or type(v).__name__ == 'module':
                    continue
                if k not in keys:
                    raise SystemExit(f"config error: {arg} sets unknown key '{k}'{_nearest(k, keys)}")
                g[k] = _check_type(k, v, g[k])
            continue
        k, eq, raw = arg[2:].partition('=')
        if k not in keys:
            raise SystemExit(f"config error: unknown key '--{k}'{_nearest(k, keys)}")
        if not eq:
            if isinstance(g[k], bool):
                raw = 'True'
            elif argv:
                raw = argv.pop(0)
            else:
                raise SystemExit(f"config error: --{k} needs a value, like --{k}={g[k]!r}")
        if isinstance(g[k], list) and not raw.lstrip().startswith('['):  # --image a --image b: collected
            g[k] = (g[k] if k in collected else []) + [raw]
            collected.add(k)
            continue
        value = raw if isinstance(g[k], str) else _parse(raw)  # --out_dir=1e3 stays a string
        g[k] = _check_type(k, value, g[k])
    return {k: g[k] for k in keys}


def script_defaults(path):
    """The literal module-level defaults of a script, without running it (bench.py uses train_vlm.py's)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out
