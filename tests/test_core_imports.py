"""The engine never imports FedML: every module but the FedML glue imports, and a server and a client
play a round, in a fresh process without ``fedml`` in ``sys.modules``."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fedml_prism

# the only modules that may import FedML: they subclass or drive FedML's classes
FEDML_GLUE = {"fedml_glue", "server_manager", "client_manager", "grpc_transport", "mqtt_transport"}  # FedML subclasses


def test_core_imports_without_fedml(tmp_path) -> None:
    modules = sorted(m.name for m in pkgutil.iter_modules(fedml_prism.__path__))
    core = [m for m in modules if m not in FEDML_GLUE]
    assert {"server", "principal", "aggregate", "train", "simulation", "cross_silo", "runner", "cli"} <= set(core)
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module('fedml_prism.' + name)\n"
        "    assert 'fedml' not in sys.modules, f'fedml_prism.{name} imported fedml'\n"
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from fedml_prism import PrismConfig, PrincipalModel\n"
        "from fedml_prism.models import cnn, resnet_tiny\n"
        "from fedml_prism.server import PrismClient, PrismServer, RunSettings\n"
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

