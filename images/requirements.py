"""Print one optional-dependency group of pyproject.toml as pip requirements, core dependencies
included and self-references (``lawtune[train]``) expanded, so an image installs its dependencies
in a layer of their own, before the code is copied (a code change then reuses that layer).

    python requirements.py pyproject.toml train [--exclude liger-kernel] > requirements.txt
"""

from __future__ import annotations

import argparse
import re

try:
    import tomllib
except ImportError:  # Python < 3.11: pip vendors the same parser
    from pip._vendor import tomli as tomllib


def requirements(project: dict, group: str, exclude: set[str]) -> list[str]:
    groups = project["optional-dependencies"]
    if group not in groups:
        raise SystemExit(f"requirements.py: no optional-dependencies group {group!r} in pyproject.toml ({sorted(groups)})")
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
    distribution = lambda req: re.split(r"[\s=<>!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    return sorted({r for r in out if distribution(r) not in exclude})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("group")
    parser.add_argument("--exclude", action="append", default=[], help="a distribution to leave out")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, args.group, {e.lower() for e in args.exclude})))


if __name__ == "__main__":
    main()
