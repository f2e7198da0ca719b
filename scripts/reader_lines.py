"""How many lines a reader walks to follow one PPO-Lag iteration: the definitions reachable from the given roots
through the project's own names (a call, a class, a decorator), each counted once with its decorators and docstring.
Third-party code (torch, transformers) is not followed; --skip names are neither counted nor followed (the types a
reader does not open to follow the step: the options, the model classes), and --within keeps the walk inside some
modules (the method's files, not the plumbing of infra/).

    python scripts/reader_lines.py --within train_ppo_lag modeling utils --skip Args ScoreModel Roles \
        -- train_ppo_lag.ppo_iteration
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def modules(repo: Path) -> dict[str, Path]:
    found = {}
    for path in list(repo.glob("*.py")) + list(repo.glob("infra/*.py")) + list(repo.glob("data/*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def index(repo: Path):
    """module -> (top-level name -> node), module -> (imported name -> (module, name))"""
    mods = modules(repo)
    defs, imports = {}, {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defs[name] = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        imports[name] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                for alias in node.names:
                    imports[name][alias.asname or alias.name] = (node.module, alias.name)
    return defs, imports


def resolve(module: str, name: str, defs, imports, seen=()):
    if name in defs.get(module, {}):
        return module, name
    if name in imports.get(module, {}) and (module, name) not in seen:
        target, original = imports[module][name]
        return resolve(target, original, defs, imports, seen + ((module, name),))
    return None


def walk(roots: list[str], defs, imports, skip=(), within=None) -> dict[tuple[str, str], int]:
    todo = [tuple(r.rsplit(".", 1)) for r in roots]
    counted = {}
    while todo:
        module, name = todo.pop()
        found = resolve(module, name, defs, imports)
        if found is None or found in counted or found[1] in skip or (within and found[0] not in within):
            continue
        node = defs[found[0]][found[1]]
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        counted[found] = node.end_lineno - start + 1
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                todo.append((found[0], sub.id))
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):  # module.function
                todo.append((found[0], sub.attr))
    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--within", nargs="*", default=[])
    args = parser.parse_args()
    defs, imports = index(Path(args.repo))
    counted = walk(args.roots, defs, imports, set(args.skip), set(args.within))
    by_file = {}
    for (module, name), lines in sorted(counted.items()):
        by_file.setdefault(module, []).append((name, lines))
    for module, items in by_file.items():
        print(f"{module}: {sum(n for _, n in items)} lines in {len(items)} definitions: "
              + ", ".join(f"{name} {n}" for name, n in items))
    print(f"total: {sum(counted.values())} lines in {len(counted)} definitions across {len(by_file)} files")


if __name__ == "__main__":
    main()
