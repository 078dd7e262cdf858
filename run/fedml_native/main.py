"""A FedML user's cross-silo driver with PriSM dropped in: FedML's usual ~20 lines, PriSM's trainer and
aggregator in place of FedML's defaults.

    .venv/bin/mpiexec -np 3 .venv/bin/python run/fedml_native/main.py --cf run/fedml_native/fedml_config.yaml

Rank 0 is the server (``PrismServerAggregator``: the global model, Eq. 3 aggregation, metrics.json in
``output_dir``), ranks 1..worker_num are the silos (``PrismClientTrainer``: each trains the sub-model the
server sent it on its own data). ``offline()`` keeps ``fedml.init()`` from calling FedML's cloud.
"""

# first: importing the glue silences the two warnings `import fedml` prints (requests, pkg_resources)
from fedml_prism.runtimes.fedml_glue import PrismClientTrainer, PrismServerAggregator, offline  # isort: split

from typing import Any

import fedml
from fedml import FedMLRunner

from fedml_prism.workloads.data import load_federated
from fedml_prism.workloads.models import create_model


def load_data(args: Any) -> tuple[list, int]:
    """FedML's 8-item dataset list: the package's digits split into ``client_num_in_total`` silos."""
    data = load_federated(args.dataset, args.client_num_in_total, args.partition_method, args.partition_alpha,
                          args.random_seed)
    return data.fedml_dataset(args.batch_size), data.num_classes


if __name__ == "__main__":
    offline()
    args = fedml.init()
    device = fedml.device.get_device(args)
    dataset, output_dim = load_data(args)
    model = create_model(args.model, num_classes=output_dim, **args.model_kwargs)
    trainer = PrismClientTrainer(model, args)
    aggregator = PrismServerAggregator(model, args)
    FedMLRunner(args, device, dataset, model, trainer, aggregator).run()
