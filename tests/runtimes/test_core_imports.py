"""The engine never imports FedML: every module but the FedML glue imports, and a server and a client
play a round, in a fresh process without ``fedml`` in ``sys.modules``."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import fedml_prism

# the only modules that may import FedML when imported: they subclass FedML's classes
FEDML_GLUE = {"fedml_glue", "runtimes.fedml_glue", "runtimes.cross_silo.server_manager",
              "runtimes.cross_silo.client_manager", "runtimes.cross_silo.grpc_transport",
              "runtimes.cross_silo.mqtt_transport", "runtimes.cross_device.server_manager",
              "runtimes.cross_device.comm_manager"}
PACKAGE = Path(fedml_prism.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name.removeprefix("fedml_prism.") for m in pkgutil.walk_packages(fedml_prism.__path__, "fedml_prism."))


def _relative_imports(path: Path) -> list[tuple[str, str]]:
    """``(layer of path, imported module relative to the package)`` of each relative import leaving the
    module's own subpackage."""
    parts = path.relative_to(PACKAGE).parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level and node.level > len(parts) - 1:
            out.append((parts[0].removesuffix(".py"), node.module or ""))
    return out


def test_layout_engine_imports_only_itself_and_nothing_imports_upward() -> None:
    """The engine imports no other part of the package; the settings and the job description sit below
    the runtimes and import nothing above them; runtimes never import the tools."""
    order = {"engine": 0, "strategies": 1, "workloads": 1, "settings": 2, "job": 2, "runtimes": 3, "tools": 4}
    for path in PACKAGE.rglob("*.py"):
        for part, module in _relative_imports(path):
            if part not in order:
                continue
            target = module.split(".")[0]
            assert target in order, f"{path}: import of {module!r}"
            assert part != "engine", f"{path}: the engine imports {module!r}"
            assert order[target] <= order[part], f"{path} imports {module!r} from a layer above it"


def test_methods_import_only_the_engine_the_workloads_and_the_driver() -> None:
    """A method module holds its algorithm: what it shares comes from the engine (rounds, training),
    the workloads (data, models) and the strategies' own base and round driver."""
    for path in (PACKAGE / "strategies").rglob("*.py"):
        for _, module in _relative_imports(path):
            assert module.split(".")[0] in ("engine", "workloads"), f"{path}: import of {module!r}"


#: FedML's and fedml-prism's names on ``args`` that are not keys of a config (command line, FedML state)
RUNTIME_NAMES = {"rank", "run_id", "role", "round_idx", "name", "comm", "device"}


def test_no_module_reads_a_raw_config_key_outside_the_job() -> None:
    """Every key of a config is resolved once, by ``job.py`` and ``settings/`` (into :class:`Job` and typed
    settings): elsewhere no ``job.flat[...]`` / ``job.flat.get(...)`` and no ``getattr(args, "<config key>")``.
    The one use of the whole mapping is handing it to FedML as its args (``Namespace(**job.flat)``)."""
    from fedml_prism.job import FEDML_KEYS, PRISM_KEYS

    keys = (set(FEDML_KEYS) | set(PRISM_KEYS)) - RUNTIME_NAMES
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "job.py" or rel.startswith("settings/"):
            continue
        tree = ast.parse(path.read_text())
        whole = {id(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                 for kw in node.keywords if kw.arg is None}  # **job.flat: the whole config, to FedML
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "flat" and id(node) not in whole \
                    and "job" in ast.unparse(node.value):
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in keys:
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert found == []


def test_core_imports_without_fedml(tmp_path) -> None:
    modules = _modules()
    core = [m for m in modules if m not in FEDML_GLUE]
    assert {"engine.server", "engine.principal", "engine.aggregate", "engine.train", "runtimes.simulation",
            "runtimes.cross_silo.launch", "runtimes.cross_device.launch", "job", "settings.security", "settings.fedml_args",
            "tools.cli", "tools.bench"} <= set(core)
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module('fedml_prism.' + name)\n"
        "    assert 'fedml' not in sys.modules, f'fedml_prism.{name} imported fedml'\n"
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from fedml_prism import PrismConfig, PrincipalModel\n"
        "from fedml_prism.workloads.models import cnn, resnet_tiny\n"
        "from fedml_prism.engine.server import PrismClient, PrismServer, RunSettings\n"
        "pm = PrincipalModel(resnet_tiny(), PrismConfig())\n"
        "pm.aggregate([(pm.sample_submodel(0, 0), 1)])\n"
        "model = cnn(num_classes=4, in_channels=1, image_size=8, width=0.25)\n"
        "settings = RunSettings(comm_round=1, client_num_in_total=2, client_num_per_round=2, batch_size=4,\n"
        "                       output_dir=sys.argv[1])\n"
        "server = PrismServer(model, PrismConfig(keep_ratio=0.5), settings)\n"
        "data = {c: TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))) for c in range(2)}\n"
        "client = PrismClient(model, PrismConfig(keep_ratio=0.5), settings, data)\n"
        "bundles = server.bundles(workers=1)\n"
        "row = server.close_round(server.updates_from_bundles([client.train_bundle(bundles[0])]))\n"
        "assert row['clients'] == 2 and server.finished\n"
        "assert 'fedml' not in sys.modules, 'fedml was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

