"""The mesh in virtual time: the production policies over simulated replicas.

``sim`` runs the autoscaler's controller and policies (``autoscaler.controller``,
``autoscaler.policy``, ``prewarm``, ``schedule``, ``placement``,
``graph_ahead``), the router's dispatch policies (``router.queueing``,
``router.dispatch``) and the pipeline graph (``router.pipelines.graph`` with
``cmesh.expr`` for ``when``) unchanged, with an injected virtual clock. Only the
replicas are simulated: their service time follows a batching curve and their
cold start and concurrency come from a model profile (``sim.profiles``).

Modules: ``events`` (the heap-based discrete-event core), ``profiles``,
``workload`` (scenarios and trace files), ``replicas`` (simulated replicas and
the provider the controller drives), ``router`` (queues and dispatch),
``pipelines`` (one request over its graph), ``stats`` (latency histograms),
``mesh`` (wiring and the run), ``plan`` (``cmesh plan``), ``calibrate``.
"""
