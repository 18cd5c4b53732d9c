"""Aggregation steps: per-row features computed from extracted MC latents ``[N, S, D]`` by the aggregate stage.

One module per estimator, one YAML per choice (``configs/estimator/<name>.yaml``, ``_target_``): ``knn`` (the
LaREx kNN entropy), ``gaussian`` (per-dimension Gaussian entropy), ``joint`` (per-dimension ++ joint kNN
entropy), and :class:`~larex.aggregation.mean.LatentMean` (the MC mean, key ``latent_mean``). No I/O, Hydra
or MLflow here: the Task turns them into :class:`~larex.tasks.base.AggregationStep` s.
"""
