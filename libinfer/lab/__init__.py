"""The performance lab (the talk, section 3) without Spark or MLflow; jobs.benchmark and
jobs.report are its entry points.

    sizes.py         the model-size ladder (random Llama shapes) and a model's shape numbers
    random_model.py  random-initialised checkpoints written as HF directories (also for tests)
    workload.py      one point: synthetic prompts of exact lengths, measured with ignore_eos
    sweep.py         many points: a workload grid, OOM searches, a corpus replay
    oom.py           the OOM boundary by search, and its table
    predictor.py     latency and peak memory fitted to the points, coefficients in hardware units
    report.py        the figures and tables built from the points
    determinism.py   how outputs change with batch size, TP degree and dtype
"""
