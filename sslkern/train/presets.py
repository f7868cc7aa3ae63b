"""Each recipe's published configuration beside its small default, as a table.

    python -m sslkern.train.presets --print dino   # one recipe's table (script or method name)
    python -m sslkern.train.presets                # every recipe's table

A recipe declares ``presets = {"paper": {option: value, ..., "_doc": "source"}}``;
``--preset paper`` applies them (flags given on the command line still win). The table lists
every option a preset sets, with the digits default beside it. A preset may only name the
recipe's options (argparse would take any name as a default silently): :func:`unknown_options`
lists the others, and :func:`preset_table` refuses a preset that has some. The repository
keeps each table in its recipe's doc (``python tools/preset_tables.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe_methods(recipes_dir: str = os.path.join(ROOT, "recipes")) -> list[tuple[str, type]]:
    """(script name, Method subclass) for every recipe script in ``recipes_dir`` (default: the
    ``recipes/`` folder beside the package in a source checkout)."""
    from sslkern.train.loop import Method

    if not os.path.isdir(recipes_dir):
        raise FileNotFoundError(f"recipes_dir {recipes_dir!r} is not a folder of recipe scripts")
    out = []
    for f in sorted(os.listdir(recipes_dir)):
        if not f.endswith(".py"):
            continue
        spec = importlib.util.spec_from_file_location(f"recipe_{f[:-3]}", os.path.join(recipes_dir, f))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Method) and cls is not Method and cls.__module__ == mod.__name__ and cls.name != "method":
                out.append((f[:-3], cls))
    return out


def unknown_options(method) -> dict[str, list[str]]:
    """{preset name: [keys that are not options of the recipe]} (empty when every key is one)."""
    from sslkern.train.loop import build_parser

    dests = {a.dest for a in build_parser(method)._actions}
    bad = {n: sorted(k for k in p if not k.startswith("_") and k not in dests) for n, p in method.presets.items()}
    return {n: keys for n, keys in bad.items() if keys}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return " ".join(_fmt(x) for x in v)
    return "–" if v is None else str(v)


def _flag(parser, dest: str):
    """(option string, switch action or None) of the option that sets ``dest``; a switch
    (``--no-bn-in-head``, ``--compile``) is shown as given or not rather than by its value."""
    actions = [a for a in parser._actions if a.dest == dest and a.option_strings]
    switch = next((a for a in actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))), None)
    if switch is not None:
        return switch.option_strings[-1], switch
    named = next((a for a in actions if f"--{dest.replace('_', '-')}" in a.option_strings), None)
    return (named or actions[0]).option_strings[-1], None


def preset_table(method) -> str:
    from sslkern.train.loop import build_parser

    bad = unknown_options(method)
    if bad:
        raise ValueError(f"{method.name}: presets name options the recipe does not have: {bad}")
    parser = build_parser(method)
    default = vars(parser.parse_args([]))
    names = sorted(method.presets)
    keys = list(dict.fromkeys(k for n in names for k in method.presets[n] if not k.startswith("_")))
    head = "| option | digits default | " + " | ".join(f"`--preset {n}`" for n in names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    for k in keys:
        flag, switch = _flag(parser, k)
        values = [default.get(k)] + [method.presets[n].get(k, default.get(k)) for n in names]
        if switch is not None:  # given or not
            values = ["given" if v == switch.const else "–" for v in values]
        lines.append("| " + " | ".join([f"`{flag}`"] + [_fmt(v) for v in values]) + " |")
    lines += [""] + [f"`{n}`: {method.presets[n].get('_doc', '')}" for n in names]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print", dest="show", metavar="RECIPE", default="",
                   help="print only this recipe's table (script or method name; default: every recipe with presets)")
    p.add_argument("--recipes", default=os.path.join(ROOT, "recipes"), help="folder of the recipe scripts")
    a = p.parse_args(argv)
    found = [(s, c) for s, c in recipe_methods(a.recipes) if c.presets and a.show in ("", s, c.name)]
    if not found:
        p.error(f"--print {a.show!r}: no recipe of that script or method name has presets")
    for _, cls in found:
        print(f"{cls.title}\n\n{preset_table(cls)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
