"""Code tasks: pass@k and the run time of generated code, every program run sandboxed.

Modules (import what you need; nothing heavy loads with the package):

* ``sandbox``: ``run(program, test, timing=…, limits=Limits())`` runs one program in its own
  confined subprocess and returns an ``ExecResult`` (status, error, output, timing);
* ``scoring``: ``pass_at_k``, ``CodeProblem``, ``CodeSettings``, ``score(problems)`` (tests in
  a small pool, then timing one problem at a time) → ``CodeTaskResult`` (metrics + records);
* ``tasks``: which lm-eval tasks are code tasks and how their samples become problems;
* ``lmeval``: ``run_code_tasks(lm, tasks, …)``: lm-eval generates (``predict_only``), the
  sandbox scores; the unsafe-code gates it opens are recorded (``gates_for``).

``evaluation.harness.run_tasks`` routes code tasks here; ``_child.py`` is the script each
sandboxed process runs.
"""
