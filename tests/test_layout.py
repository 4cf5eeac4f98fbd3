"""The package's shape that docs/ARCHITECTURE.md promises: no import circle among seekling's modules
(top-level imports), no module-level import of an optional heavy dependency, and no file over 600 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seekling"
OPTIONAL = ("transformers", "matplotlib", "math_verify", "datasets", "pyarrow", "wandb", "gguf", "llama_cpp")
SERVING_ONLY = {"seekling.server": ("fastapi", "starlette")}  # the server module is the FastAPI app itself


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_import_circle_and_no_heavy_import_at_module_level():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {n for n in top_level_imports(p) if n in modules and n != m} for m, p in modules.items()}
    for m, p in modules.items():
        heavy = [n for n in top_level_imports(p) if n.split(".")[0] in OPTIONAL + ("fastapi", "starlette", "uvicorn")
                 and n.split(".")[0] not in SERVING_ONLY.get(m, ())]
        assert not heavy, f"{m} imports {heavy} at module level"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_file_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"files over 600 lines: {long}"
