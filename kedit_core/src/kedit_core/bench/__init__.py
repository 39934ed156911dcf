"""``kedit bench``: the EasyEdit paper's tables and a sequential-editing figure on one model.

- :mod:`.config` -- what to run (methods, data subsets, record counts), a validated YAML/JSON file;
- :mod:`.jobs` -- one measurement (a method on a data subset, in one mode), run in its own process so
  that its peak memory is its own;
- :mod:`.runner` -- plans the jobs from the methods' capability flags (per model and sweep variant),
  runs them on an executor (each result cached on disk under a key of everything that determines it,
  so an interrupted bench resumes);
- :mod:`.ray_executor` -- the jobs as tasks on a Ray cluster (``kedit bench --ray``);
- :mod:`.report` -- Table 1, Table 2, the CounterFact table and the figure, as JSON, markdown and PNG;
- :mod:`.compare` -- the differences between two bench JSON files.
"""
