"""Pipelines: chains of steps from a YAML file (``spec``), the ``main`` / ``mlproject run``
command's options (``config``), and running them as a parent run with reuse (``runner``)."""
