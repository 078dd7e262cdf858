"""The command-line tools behind ``fedml-prism``: ``run`` (every runtime), ``bench`` (strategies side by
side), and ``cli`` (argument parsing; ``costs``, ``rank``, ``partition``, ``keys``)."""
