"""The packages depend one way: `workers` and the operators' tools build on the core, and the console on the
operators' tools, never the reverse.

ingest/cli.py is the composition root (the `hipcall-ingest` command wires the ingress, the worker and
the operators' tools together) and is the one module allowed to import from every package.
"""

import ast

from conftest import ROOT

COMPOSITION_ROOT = {"ingest/cli.py", "ingest/__main__.py"}
REQUEST_PATH = {"ingest/http.py", "ingest/spool.py", "ingest/publish.py", "ingest/broker.py", "ingest/message.py",
                "ingest/topology.py", "ingest/config.py"}


def imports() -> dict[str, set[str]]:
    """Module path -> every module it imports (absolute names; relative imports resolved)."""
    found = {}
    for path in [*ROOT.glob("ingest/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        package = relative.rsplit("/", 1)[0].replace("/", ".")
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        found[relative] = names
    return found


def test_nothing_in_the_core_imports_the_workers_or_the_operators_tools():
    wrong = {
        module: sorted(n for n in names if n.split(".")[0] == "workers" or n.startswith(("ingest.ops", "ingest.console")))
        for module, names in imports().items()
        if module.startswith("ingest/") and not module.startswith(("ingest/ops/", "ingest/console/"))
        and module not in COMPOSITION_ROOT
    }
    assert {m: n for m, n in wrong.items() if n} == {}


def test_workers_and_operators_tools_never_import_the_cli_or_each_other():
    wrong = {}
    for module, names in imports().items():
        if module.startswith("workers/"):
            bad = [n for n in names if n.startswith(("ingest.cli", "ingest.ops"))]
        elif module.startswith("ingest/ops/"):  # the console builds on them, never the reverse
            bad = [n for n in names if n.startswith(("ingest.cli", "ingest.console")) or n.split(".")[0] == "workers"]
        elif module.startswith("ingest/console/"):
            bad = [n for n in names if n.startswith("ingest.cli") or n.split(".")[0] == "workers"]
        else:
            continue
        if bad:
            wrong[module] = sorted(bad)
    assert wrong == {}


def test_the_request_path_never_imports_the_development_node_helper():
    wrong = {m: sorted(n for n in names if "localnode" in n) for m, names in imports().items() if m in REQUEST_PATH}
    assert {m: n for m, n in wrong.items() if n} == {}


def test_the_import_scan_sees_the_edges_it_is_checking():
    """The scan itself: the composition root's known edges are found, so an empty result above means something."""
    seen = imports()
    assert "workers.runtime" in seen["ingest/cli.py"] and "ingest.ops.dlq" in seen["ingest/cli.py"]
    assert "ingest.message.republish_properties" in seen["workers/runtime.py"]
    assert "ingest.message.SWEEP_HEADER" in seen["ingest/ops/dlq.py"]
    assert "ingest.ops.dlq" in seen["ingest/console/app.py"]
