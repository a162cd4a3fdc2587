"""MetaInf: picks an acceleration method and a consumer group for each request.

The broker talks to it only through :class:`scheduler.interface.SchedulingPolicy`:

- :class:`scheduler.selection.MetaInfPolicy` -- Algorithm 2 over a trained model;
- :class:`scheduler.selection.ExpertRulesPolicy` -- the documented cold-start rules;
- :class:`scheduler.online.OnlineLearner` -- a policy that also learns from telemetry
  (``observe``), retrains in a child process and swaps models atomically;
  :func:`scheduler.metainf.build_policy` builds one for ``--scheduler metainf``.

Its only I/O is model files and, for the online learner, its state directory.
See docs/scheduler.md.
"""
