"""Write each recipe's published settings (its ``presets``) as a table into its doc.

    python tools/preset_tables.py            # rewrite the tables in docs/recipes/*.md
    python tools/preset_tables.py --check    # exit 1, naming the docs, if a table is stale

The table (``sslkern.train.presets.preset_table``: every option a preset sets, the digits
default beside it, then each preset's source) of ``recipes/NAME.py`` goes between
``<!-- presets:begin -->`` and ``<!-- presets:end -->`` in ``docs/recipes/NAME.md``; a doc
without the markers gets a "Published settings" section with them at its end. A script with
several methods (``recipes/pretext.py``) gets one titled table per method. Recipes without
presets, and recipes without a doc, are left alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root (holds sslkern/, recipes/, docs/)
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this tree's sslkern
    sys.path.insert(1, str(ROOT))

from sslkern.train.presets import preset_table, recipe_methods  # noqa: E402

BEGIN, END = "<!-- presets:begin -->", "<!-- presets:end -->"
SECTION = "## Published settings (`--preset paper`)"


def tables(recipes_dir: Path) -> dict[str, str]:
    """{script name: the markdown that goes between the markers} for every script with presets."""
    by_script: dict[str, list] = {}
    for script, cls in recipe_methods(str(recipes_dir)):
        if cls.presets:
            by_script.setdefault(script, []).append(cls)
    return {script: "\n\n".join((f"**{c.title}**\n\n" if len(classes) > 1 else "") + preset_table(c)
                                for c in classes)
            for script, classes in by_script.items()}


def with_table(doc: str, table: str) -> str:
    """``doc`` with ``table`` between its markers (a new section with markers if it has none)."""
    if doc.count(BEGIN) > 1 or doc.count(END) > 1:
        raise ValueError(f"expected at most one {BEGIN} / {END} pair")
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        if END not in rest:
            raise ValueError(f"{END} comes before {BEGIN}")
        return f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}"
    if BEGIN in doc or END in doc:
        raise ValueError(f"expected both {BEGIN} and {END}, found one")
    return (f"{doc.rstrip()}\n\n{SECTION}\n\nThe published configuration at 224 pixels beside the digits "
            f"defaults; written by `python tools/preset_tables.py` from the recipe's `presets`.\n\n"
            f"{BEGIN}\n{table}\n{END}\n")


def update(docs_dir: Path, recipes_dir: Path, *, check: bool) -> list[Path]:
    """The docs whose table differs from the recipe's presets; rewritten unless ``check``."""
    changed = []
    for script, table in tables(recipes_dir).items():
        path = docs_dir / f"{script}.md"
        if not path.exists():
            continue
        doc = path.read_text()
        try:
            new = with_table(doc, table)
        except ValueError as e:
            raise SystemExit(f"{path}: {e}") from None
        if new != doc:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a doc's table is stale")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "recipes", help="folder of the recipe docs")
    p.add_argument("--recipes", type=Path, default=ROOT / "recipes", help="folder of the recipe scripts")
    a = p.parse_args(argv)
    changed = update(a.docs, a.recipes, check=a.check)
    for path in changed:
        print(f"{'stale' if a.check else 'wrote'} {path}")
    if a.check and changed:
        print("run: python tools/preset_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
