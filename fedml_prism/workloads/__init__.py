"""Data and models: federated partitions (``data``), offline loaders of real datasets in their
published on-disk formats (``datasets``), and the built-in models (``models``)."""
