"""Pipeline stage entrypoints: ``python -m jobs.<stage>``. Jobs never import each other."""
