"""Guards for how ctxtree is installed: one top-level import name that shadows nobody,
imports that point one way, declared dependencies equal to imported ones, and a lock
that pins every package to a version pyproject.toml allows.

Each of these broke a fresh install once (issue 14): a top-level package named
`kernels` shadowed Hugging Face's `kernels`, which transformers >= 5.25 imports."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; on 3.10 these guards are skipped
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OURS = {"ctxtree", "tests", "bench"}

# Declared but never imported, with the reason; anything else declared must be imported.
NOT_IMPORTED = {
    "gguf": "transformers' GGUF loader reads the default model with it",
    "accelerate": "transformers refuses to load a GGUF file without it",
    "numpy": "torch's Tensor.numpy() (the weights digest) needs it",
    "flask": "moto's ThreadedMotoServer runs on it",
    "flask-cors": "moto's ThreadedMotoServer runs on it",
    "setuptools": "test_wheel_* builds the wheel with it, without network",
    "wheel": "same",
}


# Modules that import an optional extra, and that extra: vllm_model.py at its top (vLLM loads
# it by name), vllm_engine.py when an engine is built, vllm_plugin.py when vLLM calls it.
OPTIONAL_MODULES = {"ctxtree/kernels/vllm_model.py": "vllm", "ctxtree/kernels/vllm_engine.py": "vllm",
                    "ctxtree/kernels/vllm_plugin.py": "vllm"}


def requirements(group: str) -> list[Requirement]:
    raw = PYPROJECT["project"]["dependencies"] if group == "main" else \
        PYPROJECT["project"]["optional-dependencies"][group]
    return [Requirement(r) for r in raw]


def lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


# --- Hugging Face's `kernels` is importable beside ours ------------------------------

HUB_KERNELS_SCRIPT = r"""
import importlib.metadata, pkgutil
from pathlib import Path
import ctxtree
for m in pkgutil.walk_packages(ctxtree.__path__, "ctxtree."):
    if m.name not in OPTIONAL:
        __import__(m.name)                    # every module of ours first
import kernels
theirs = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
assert Path(kernels.__file__).resolve() == theirs, f"`import kernels` found {kernels.__file__}, not {theirs}"
from kernels import get_kernel, kernelize      # what transformers' integration imports
from transformers.utils import is_kernels_available
assert is_kernels_available(), "transformers sees no usable `kernels`"
import transformers.integrations.hub_kernels
import torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
logits = LlamaForCausalLM(cfg).eval()(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 97)
print("ok", importlib.metadata.version("kernels"))
"""


def test_hugging_face_kernels_loads_beside_ctxtree_and_transformers_builds_a_llama():
    """Run from the checkout's root, where a top-level `kernels/` of ours used to win."""
    assert md.version("kernels"), "Hugging Face's kernels must be installed, as transformers wants"
    optional = {p.removesuffix(".py").replace("/", ".") for p in OPTIONAL_MODULES}
    run = subprocess.run([sys.executable, "-c", f"OPTIONAL = {optional!r}\n" + HUB_KERNELS_SCRIPT], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]


# --- the wheel owns exactly one top-level name ----------------------------------------

def test_wheel_installs_one_top_level_package_with_the_cli_and_the_shipped_adapter(tmp_path):
    src = tmp_path / "src"  # the checkout as git sees it (no build outputs, no venv)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("ctxtree-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert {n.split("/")[0] for n in names} - dist_info == {"ctxtree"}
    (info,) = dist_info
    top_level = zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["ctxtree"]
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "ctxtree = ctxtree.cli:main" in entry_points
    for room in ("kernels", "pipelines", "serve"):
        assert f"ctxtree/{room}/__init__.py" in names
    assert any(n.endswith("adapter.safetensors") for n in names if n.startswith("ctxtree/adapters/"))
    assert not any("warmstart" in n or n.endswith(".jsonl") for n in names), "training outputs leave the package"


# --- imports point one way ------------------------------------------------------------

def module_imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against ctxtree)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "ctxtree":
        return "outside"
    if len(parts) > 1 and parts[1] in ("kernels", "pipelines", "serve"):
        return parts[1]
    return "core"


# Which rooms each room may import. cli.py is the program's entry point: it dispatches
# to the pipelines and the server, so it is the one core module allowed above the core.
ALLOWED = {"kernels": {"kernels"}, "core": {"kernels", "core"},
           "pipelines": {"kernels", "core", "pipelines"}, "serve": {"kernels", "core", "serve"}}
ENTRY_POINTS = {"ctxtree.cli"}


def test_imports_point_one_way():
    bad = []
    for path in sorted((REPO / "ctxtree").rglob("*.py")):
        me = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for imported in module_imports(path):
            top = imported.split(".")[0]
            if top in ("kernels", "pipelines", "serve", "bench", "tests"):
                bad.append(f"{me} imports {imported} (top-level name; ours live under ctxtree.)")
            elif top == "ctxtree" and me not in ENTRY_POINTS and room(imported) not in ALLOWED[room(me)]:
                bad.append(f"{me} ({room(me)}) imports {imported} ({room(imported)})")
    assert not bad, "\n".join(bad)


def test_no_stale_top_level_imports_in_tests_and_benches():
    bad = [f"{p.relative_to(REPO)}: {m}" for d in ("tests", "bench") for p in sorted((REPO / d).rglob("*.py"))
           for m in module_imports(p) if m.split(".")[0] in ("kernels", "pipelines", "serve")]
    assert not bad, "\n".join(bad)


# --- declared dependencies = imported dependencies ------------------------------------

def third_party_distributions(paths: list[Path]) -> dict[str, set[str]]:
    """Distribution name -> files importing it, for every non-stdlib, non-ours import."""
    by_module = md.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in paths:
        for module in module_imports(path):
            top = module.split(".")[0]
            if top in OURS or top in sys.stdlib_module_names or top == "__future__":
                continue
            assert top in by_module, f"{path.relative_to(REPO)} imports {top}, which no installed package provides"
            for dist in by_module[top]:
                found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_declared_dependencies_are_the_imported_ones():
    main = {canonicalize_name(r.name) for r in requirements("main")}
    dev = {canonicalize_name(r.name) for r in requirements("dev")}
    runtime_imports = third_party_distributions(sorted(p for p in (REPO / "ctxtree").rglob("*.py")
                                                       if str(p.relative_to(REPO)) not in OPTIONAL_MODULES))
    dev_imports = third_party_distributions(sorted(p for d in ("tests", "bench") for p in (REPO / d).rglob("*.py")))

    undeclared = {d: f for d, f in runtime_imports.items() if d not in main}
    assert not undeclared, f"imported by the package, not in [project.dependencies]: {undeclared}"
    undeclared_dev = {d: f for d, f in dev_imports.items() if d not in main | dev}
    assert not undeclared_dev, f"imported by tests/bench, not declared: {undeclared_dev}"
    unused = main - set(runtime_imports) - set(NOT_IMPORTED)
    assert not unused, f"declared in [project.dependencies], imported by no module of ctxtree: {unused}"
    unused_dev = dev - set(dev_imports) - set(NOT_IMPORTED)
    assert not unused_dev, f"declared in the dev extra, imported by no test or bench: {unused_dev}"


# --- the lock ----------------------------------------------------------------------------

def installed_closure(extras: set[str]) -> set[str]:
    """Every distribution ctxtree[extras] needs, by walking installed metadata."""
    seen: set[str] = set()
    todo = [(canonicalize_name("ctxtree"), frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        for raw in md.requires(name) or []:
            req = Requirement(raw)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            dep = canonicalize_name(req.name)
            key = f"{dep}[{','.join(sorted(req.extras))}]"
            if key not in seen:
                seen.add(key)
                todo.append((dep, frozenset(req.extras)))
    return {k.split("[")[0] for k in seen}


def test_lock_pins_every_package_to_a_version_pyproject_allows():
    pins = lock()
    for group in ("main", "dev"):
        for req in requirements(group):
            name = canonicalize_name(req.name)
            assert name in pins, f"requirements.lock has no pin for {req}"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req}"
    missing = installed_closure({"dev"}) - set(pins)
    assert not missing, f"needed by ctxtree[dev] but not pinned in requirements.lock: {sorted(missing)}"
    assert "kernels" in pins, "transformers needs Hugging Face's kernels: the lock must carry it"


def test_this_environment_was_installed_from_the_lock():
    """`make` installs with `pip install -c requirements.lock`: what is installed is what is pinned."""
    drift = {}
    for name, version in lock().items():
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            continue  # pinned for another platform's needs
        if installed != version:
            drift[name] = f"{installed} installed, {version} locked"
    assert not drift, f"the venv does not match requirements.lock (rerun make): {drift}"


def test_optional_modules_import_only_what_their_extra_and_the_main_dependencies_declare():
    by_module = md.packages_distributions()
    main = {canonicalize_name(r.name) for r in requirements("main")}
    for rel, extra in OPTIONAL_MODULES.items():
        declared = {canonicalize_name(r.name) for r in requirements(extra)}
        for module in module_imports(REPO / rel):
            top = module.split(".")[0]
            if top in OURS or top in sys.stdlib_module_names or top == "__future__":
                continue
            provided = {canonicalize_name(d) for d in by_module.get(top, [])}
            assert provided & main or canonicalize_name(top) in declared, \
                f"{rel} imports {top}: neither a main dependency nor in the {extra!r} extra"
