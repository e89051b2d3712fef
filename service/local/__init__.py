"""Processes this machine runs for ``make serve``, benchmarks and tests.

``processes``: free ports, helpers that die with their parent, and ``SupervisedProcess``, the
start / watch / restart / stop machinery of every helper process (``EmbeddedRedis``, ``StoreProcess``);
it imports nothing else of the service, so the store can use it and stay torch-free.
``stack``: ``LocalStack``, everything on this machine (Redis, the store, Ray, Serve).
``store_process``: the store server as a child process. ``run``: ``run_local``, what ``make serve``
runs until Ctrl-C, and its banner; ``terminal``: Ctrl-C under make reaches the server, not make;
``quiet``: the start-up lines of Ray, Serve and transformers that do not concern our users, silenced.
"""
