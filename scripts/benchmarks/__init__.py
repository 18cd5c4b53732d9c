"""The benchmark groups of ``scripts/bench.py``, one module each (``entropy``, ``scoring``, ``baselines``, ``mc``,
``memory``, ``stages``), and ``common`` (sizes, the table row, timing). Imported as ``benchmarks.<module>`` from
``scripts/bench.py`` (its folder is on ``sys.path`` when it runs as a script); not an installed package."""
