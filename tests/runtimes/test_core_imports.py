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


def test_layout_engine_imports_only_itself_and_nothing_imports_upward() -> None:
    """The engine imports no other part of the package; the job description sits below the runtimes;
    runtimes never import the tools."""
    order = {"engine": 0, "strategies": 1, "workloads": 1, "job": 2, "runtimes": 3, "tools": 4}
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part not in order:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for top-level modules
                if node.level <= depth:
                    continue  # within its own subpackage
                target = (node.module or "").split(".")[0]
                assert target in order, f"{path}: import of {node.module!r}"
                if part == "engine":
                    raise AssertionError(f"{path}: the engine imports {node.module!r}")
                if target == "runtimes" and part == "job":
                    assert node.module in ("runtimes.security", "runtimes.cross_device.mnn_sandbox"), f"{path}: {node.module}"
                    continue
                assert order[target] <= order[part], f"{path} imports {node.module!r} from a layer above it"


def test_core_imports_without_fedml(tmp_path) -> None:
    modules = _modules()
    core = [m for m in modules if m not in FEDML_GLUE]
    assert {"engine.server", "engine.principal", "engine.aggregate", "engine.train", "runtimes.simulation",
            "runtimes.cross_silo.launch", "runtimes.cross_device.launch", "job", "tools.cli", "tools.bench"} <= set(core)
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

