"""Print one optional-dependency group of pyproject.toml as pip requirements, core dependencies
included and self-references (``lawtune[train]``) expanded, so an image installs its dependencies
in a layer of their own, before the code is copied (a code change then reuses that layer).

    python requirements.py pyproject.toml train [--exclude liger-kernel] > requirements.txt
    python requirements.py pyproject.toml eval --without train > eval-only.txt

`--without GROUP` leaves out everything GROUP installs (core dependencies included): an image that
installed GROUP in an earlier layer, shared with other images, adds only the rest in a layer of its own.
"""

from __future__ import annotations

import argparse
import re

try:
    import tomllib
except ImportError:  # Python < 3.11: pip vendors the same parser
    from pip._vendor import tomli as tomllib


def requirements(project: dict, group: str, exclude: set[str], without: str | None = None) -> list[str]:
    groups = project["optional-dependencies"]
    for name in (group, without):
        if name is not None and name not in groups:
            raise SystemExit(f"requirements.py: no optional-dependencies group {name!r} in pyproject.toml ({sorted(groups)})")
    if without is not None:
        exclude = exclude | {distribution(r) for r in requirements(project, without, set())}
    out, todo, seen = list(project.get("dependencies", [])), [group], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for req in groups[name]:
            own = re.fullmatch(rf"{re.escape(project['name'])}\[([^\]]+)\]", req.replace(" ", ""))
            if own:
                todo += [g for g in own.group(1).split(",") if g not in seen]
            else:
                out.append(req)
    return sorted({r for r in out if distribution(r) not in exclude})


def distribution(req: str) -> str:
    return re.split(r"[\s=<>!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("group")
    parser.add_argument("--exclude", action="append", default=[], help="a distribution to leave out")
    parser.add_argument("--without", help="leave out what this group installs (it is in an earlier layer)")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, args.group, {e.lower() for e in args.exclude}, args.without)))


if __name__ == "__main__":
    main()
