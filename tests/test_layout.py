"""The code's shape: imports run one way. No import circle among the project's modules, none between its
folders, and ``bert_ds`` never imports ``data_tools`` (``data_tools`` is command lines over ``bert_ds.data``).

Imports are read with ``ast`` from every ``import`` statement, those inside functions included, so a
circle hidden in a function-level import is found too.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bert_ds", "data_tools")


def module_files() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def folder_of(module: str) -> str:
    """The room a module lives in: its sub-package (bert_ds.data, bert_ds.zero, ...) or, at the top, itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_circle_among_modules():
    graph = import_graph(module_files())
    assert sum(map(len, graph.values())) > 50  # the graph was really read
    assert cycles(graph) == []


def test_no_import_circle_between_folders():
    graph = import_graph(module_files())
    folders: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        folders.setdefault(folder_of(mod), set()).update(folder_of(t) for t in targets if folder_of(t) != folder_of(mod))
    assert cycles(folders) == []


def test_bert_ds_never_imports_data_tools():
    graph = import_graph(module_files())
    back = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("bert_ds") for t in targets if t.startswith("data_tools"))
    assert back == []
    assert any(t.startswith("bert_ds.data") for m, ts in graph.items() if m.startswith("data_tools") for t in ts)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"a.py": "import b", "b.py": "from a import x"}, [["a", "b"]]),
        ({"a.py": "def f():\n    from b import y", "b.py": "import c", "c.py": "import a"}, [["a", "b", "c"]]),
        ({"a.py": "import b", "b.py": "import c", "c.py": ""}, []),
    ],
    ids=["two", "inside-a-function", "none"],
)
def test_the_checker_finds_a_circle(tmp_path, files, expected):
    mods = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        mods[name.removesuffix(".py")] = tmp_path / name
    assert cycles(import_graph(mods)) == expected


COMMANDS = ["bert_ds", "bert_ds.train", "bert_ds.export", "bert_ds.evaluate", "bert_ds.finetune", "bert_ds.preflight", "bert_ds.jit_ops",
            "bert_ds.hostfile", "data_tools.train_tokenizer", "data_tools.preprocess", "data_tools.merge", "data_tools.inspect",
            "data_tools.sample_corpus"]  # fmt: skip


def test_every_documented_command_line_name_still_answers():
    """``python -m NAME --help`` for every command the README names, moved modules included (one process, runpy)."""
    import subprocess
    import sys

    script = (
        "import io, json, runpy, sys, contextlib\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    sys.argv = [name, '--help']\n"
        "    buf = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            runpy.run_module(name, run_name='__main__', alter_sys=True)\n"
        "        code = 0\n"
        "    except SystemExit as e:\n"
        "        code, text = e.code, buf.getvalue()\n"
        "        out[name] = [code if isinstance(code, int) or code is None else 0, (text + (code if isinstance(code, str) else ''))[:400]]\n"
        "        continue\n"
        "    out[name] = ['returned without --help handling', buf.getvalue()[:400]]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *COMMANDS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in COMMANDS:
        code, text = answers[name]
        assert code in (0, None), (name, code, text)
        assert "usage" in text.lower() or "python -m" in text, (name, text)
