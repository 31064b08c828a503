"""The package's shape, checked over its import graph and source (docs/ARCHITECTURE.md "Layout"):
- no engine under workers/engines/<x>/ imports another engine's package, nor the frontend;
- runtime/ is planes only: it imports no other kvrelay package and defines no model or KV types;
- workers/core is engine-neutral and below the worker: it imports kvbm, workers/api, itself and the
  settings helpers of runtime/config.py only (never workers/protocol, the worker, an engine or the frontend), and its scheduler and sequence know
  KV from elsewhere only through the KV-source door (no tier, handoff or peer names);
- endpoint names and engine error kinds are never string literals outside workers/api.
"""

from __future__ import annotations

import ast
from pathlib import Path

from kvrelay.workers.api.endpoints import Endpoint, ErrorKind

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if ".shim" not in p.parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; the package uses absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_engines_import_no_other_engine_nor_the_frontend():
    engines = sorted(p.name for p in (ROOT / "workers" / "engines").iterdir() if (p / "__init__.py").is_file())
    assert {"native", "mocker"} <= set(engines)
    for engine in engines:
        others = [f"kvrelay.workers.engines.{e}" for e in engines if e != engine]
        for path in modules(f"workers/engines/{engine}"):
            for name in imports(path):
                assert not any(name == o or name.startswith(o + ".") for o in others), f"{path} imports {name}"
                assert not name.startswith("kvrelay.frontend"), f"{path} imports {name}"


def test_runtime_is_planes_only():
    kv_or_model = ("Kv", "Model", "Engine", "Sampling", "Tier", "Block", "Prefill")
    for path in modules("runtime"):
        for name in imports(path):
            if name.startswith("kvrelay."):
                assert name.startswith("kvrelay.runtime"), f"{path} imports {name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert not any(w in node.name for w in kv_or_model), f"{path} defines {node.name}"


def test_core_imports_only_kvbm_api_and_itself():
    allowed = ("kvrelay.kvbm", "kvrelay.workers.api", "kvrelay.workers.core", "kvrelay.runtime.config")
    for path in modules("workers/core"):
        for name in imports(path):
            if name.startswith("kvrelay."):
                assert name.startswith(allowed), f"{path} imports {name}"


def test_scheduler_and_sequence_know_one_door_for_foreign_kv():
    for file in ("scheduler.py", "sequence.py"):
        path = ROOT / "workers" / "core" / file
        for name in imports(path):
            assert not name.startswith("kvrelay.workers.core.kv_sources.") or name.startswith(
                "kvrelay.workers.core.kv_sources.kv_door"), f"{path} imports {name}"
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        tree = ast.parse(code)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for word in ("tier", "onboard", "offload", "handle", "pull", "peer", "lower"):
            hits = sorted(n for n in names if word in n.lower())
            assert not hits, f"{path} names {hits}: KV from elsewhere goes through kv_sources/"


def _literal_arg(call: ast.Call, index: int) -> str | None:
    if len(call.args) > index and isinstance(call.args[index], ast.Constant) and isinstance(call.args[index].value, str):
        return call.args[index].value
    return None


def _export_tables(tree: ast.AST) -> set[int]:
    """ids of the string constants in `__all__` / `_EXPORTS` (symbol names, not kinds)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("__all__", "_EXPORTS")
                                                for t in node.targets):
            ids.update(id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant))
    return ids


def test_endpoint_names_and_error_kinds_are_constants_outside_workers_api():
    endpoints, kinds = {e.value for e in Endpoint}, {k.value for k in ErrorKind}
    found = []
    for folder in (*PACKAGES, "tests"):
        for path in modules(folder):
            if path.is_relative_to(ROOT / "workers" / "api") or path == Path(__file__).resolve():
                continue
            tree = ast.parse(path.read_text())
            exports = _export_tables(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    # rpc.call(address, ENDPOINT, ...), rpc.unary(address, ENDPOINT, ...), add_endpoint(ENDPOINT, ...)
                    index = {"call": 1, "unary": 1, "add_endpoint": 0}.get(node.func.attr)
                    name = _literal_arg(node, index) if index is not None else None
                    if name in endpoints:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: endpoint {name!r}")
                if isinstance(node, ast.Constant) and node.value in kinds and id(node) not in exports:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: error kind {node.value!r}")
    assert not found, "\n".join(found)
