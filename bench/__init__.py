"""Benchmarks of this server against its peers on the same GGUF and machine (``make bench``).

One of each thing, shared by every bench:

* ``bench.servers``: how each server is found, started with matching settings and stopped;
* ``bench.client``: the load client (raw-socket HTTP/1.1, a fresh connection per request);
* ``bench.report``: the statistics (one percentile definition) and ``make bench``'s outputs;
* ``bench.facts``: the machine and the commit (also in the tests' ``findings.json``);
* ``bench.model``: the random-weight bench models every bench serves.

The benches: ``python -m bench`` (``bench.run``: single streams against the floor, and
concurrency, against llama-cpp-python's server and ``llama-server``) and ``python -m
bench.many_streams`` (1 to 64 streams against ``--parallel 64`` and ``llama-server -np 64``,
against the batched engine floor of ``bench.engine_floor`` and the client ceiling of
``bench.sse_stub``), both run by ``make bench``; ``python -m bench.batching``
(``--parallel`` against ``llama-server -np N`` on the bench model), ``python -m
bench.profile`` (where the server's CPU goes per token) and ``python -m bench.stream``
(streamed requests against a running server).
"""
