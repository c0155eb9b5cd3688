#!/usr/bin/env python3
"""Writes the OpenAPI v3 schema of each CustomResourceDefinition given into one JSON file here.

    deploy/schemas/extract.py --source "owner/repo@tag (commit)" CRD.yaml [CRD.yaml ...]

scripts/check_deploy.py validates our custom resources against these files, so the check runs
offline and against the exact upstream release named in README.md. `description` strings are
dropped (half the bytes, no effect on validation); a property that happens to be called
`description` is kept, since under `properties` the keys are field names, not keywords.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def strip_descriptions(node, under_properties=False):
    if isinstance(node, dict):
        return {
            key: strip_descriptions(value, under_properties=(key == "properties" and not under_properties))
            for key, value in node.items()
            if under_properties or not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(item) for item in node]
    return node


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="upstream repository, tag and commit")
    parser.add_argument("crds", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.crds:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                api_version = f"{spec['group']}/{version['name']}"
                out = HERE / f"{spec['names']['kind'].lower()}-{spec['group']}-{version['name']}.json"
                record = {
                    "apiVersion": api_version,
                    "kind": spec["names"]["kind"],
                    "scope": spec["scope"],
                    "source": f"{args.source}: {path.name}",
                    "schema": strip_descriptions(version["schema"]["openAPIV3Schema"]),
                }
                out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
                print(f"{out.name}: {api_version} {spec['names']['kind']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
