"""Optuna search over pipeline parameters: spaces (``space``), multi-fidelity scoring
(``fidelity``), the study and its workers (``study``, the ``search`` command), and what the
study run shows (``report``)."""
