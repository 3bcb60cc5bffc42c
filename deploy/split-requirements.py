"""Split pyproject.toml's dependencies into the images' two requirement files (used by the Dockerfile).

usage: python split-requirements.py pyproject.toml SHARED_OUT TRAINER_OUT

The names in [tool.carvae] trainer-only go to TRAINER_OUT, every other dependency to SHARED_OUT. Runs on
the base image's bare Python (3.11+: tomllib), before any package is installed.
"""

import re
import sys
import tomllib


def name(requirement: str) -> str:
    # PEP 508: the name comes first; PEP 503 normalisation, so "Matplotlib" and "matplotlib" match.
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0]).lower()


def main(pyproject: str, shared_out: str, trainer_out: str) -> None:
    with open(pyproject, "rb") as f:
        config = tomllib.load(f)
    dependencies = config["project"]["dependencies"]
    trainer_only = {name(n) for n in config["tool"]["carvae"]["trainer-only"]}
    unknown = trainer_only - {name(d) for d in dependencies}
    if unknown:  # a typo would otherwise put a package in neither image
        sys.exit(f"[tool.carvae] trainer-only names {sorted(unknown)}, which are not dependencies")
    with open(shared_out, "w") as shared, open(trainer_out, "w") as trainer:
        for d in dependencies:
            print(d, file=trainer if name(d) in trainer_only else shared)


if __name__ == "__main__":
    main(*sys.argv[1:])
