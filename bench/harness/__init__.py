"""What every benchmark here shares, so that a scenario script holds only its configuration
and a short loop.

* ``processes``: start servers on free ports, wait for them, stop them, read their memory;
* ``load``: one load run with wrk and the JSON summary its Lua script prints (``wrkscript.lua``);
* ``cpu``: CPU accounting — a process's, a core's, our own — and waiting for a quiet machine;
* ``environment``: what a result depends on (versions, commit, machine);
* ``cells``: in-process cells (ops on one event loop, client CPU per op) and ratios (pairs,
  medians, interquartile range, spread);
* ``stores``: setting up and clearing the Redis and PostgreSQL namespaces a run writes;
* ``report``: tables, in rich or in Markdown.

Scripts run from the checkout (``python bench/overhead/run.py``); each puts the checkout's root
on ``sys.path`` first so that ``bench.harness`` imports.
"""
