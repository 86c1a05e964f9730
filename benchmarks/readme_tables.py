"""Put generated tables into the docs verbatim, or check that the docs still hold them.

A generated table sits between two markers, and the command that produced it is printed next to it:

    <!-- begin demo-quick -->
    ...the file the command wrote, verbatim...
    <!-- end demo-quick -->

Usage:

    python benchmarks/readme_tables.py README.md demo-quick demo-out/table.md            # write the block
    python benchmarks/readme_tables.py README.md demo-quick demo-out/table.md --check    # exit 1 if it differs
    python benchmarks/readme_tables.py README.md paper runs/paper/report/protection.md \
        --section "mnist, victim lenet5"                # one section (### heading) of a report table

The slow test ``tests/test_readme_figures.py`` reruns the quick demo and compares its table with the
README's ``demo-quick`` block through :func:`block`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- begin {re.escape(name)} -->\n)(.*?)(<!-- end {re.escape(name)} -->)", re.S)


def block(text: str, name: str) -> str:
    """The content of block ``name`` in ``text`` (raises ``KeyError`` if it is missing)."""
    m = _pattern(name).search(text)
    if m is None:
        raise KeyError(f"no block {name!r} (<!-- begin {name} --> ... <!-- end {name} -->)")
    return m.group(2)


def with_block(text: str, name: str, content: str) -> str:
    """``text`` with block ``name`` replaced by ``content`` (a final newline is added if missing)."""
    block(text, name)
    content = content if content.endswith("\n") else content + "\n"
    return _pattern(name).sub(lambda m: m.group(1) + content + m.group(3), text, count=1)


def section(text: str, title: str) -> str:
    """The lines under the ``### {title}`` heading of a report file, up to the next heading, trimmed."""
    lines = text.splitlines()
    try:
        start = lines.index(f"### {title}") + 1
    except ValueError:
        raise KeyError(f"no section '### {title}'") from None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end]).strip("\n") + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("doc", type=Path, help="the Markdown file holding the block")
    ap.add_argument("name", help="the block's name")
    ap.add_argument("source", type=Path, help="the generated file (e.g. demo-out/table.md)")
    ap.add_argument("--section", help="take only this section (the text of its ### heading) of the source")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the block differs")
    args = ap.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    source = args.source.read_text(encoding="utf-8")
    new = with_block(text, args.name, source if args.section is None else section(source, args.section))
    if args.check:
        if new != text:
            print(f"{args.doc}: block {args.name!r} differs from {args.source}", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
