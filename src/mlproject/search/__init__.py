"""Optuna search over pipeline parameters: the command's options (``config``), spaces
(``space``), multi-fidelity scoring (``fidelity``), the trial vocabulary (``trials``), storages
and studies (``storage``), the worker processes that run trials (``workers``), the ``search``
command (``study``), and what the study run shows (``report``)."""
