"""The simulated host's CPU sharing: processor sharing between computing replicas."""
from sim.events import EventLoop
from sim.profiles import HostProfile
from sim.replicas import Host


def _host(cores: float | None, overhead: float = 0.0) -> tuple[EventLoop, Host]:
    loop = EventLoop()
    return loop, Host(HostProfile(cores=cores, overhead_cores=overhead), loop)


def _job(loop: EventLoop, host: Host, work: float, done: dict, name: str, cores: float = 1.0) -> None:
    def finish() -> None:
        done[name] = loop.now
        host.use(-cores)

    host.use(cores)
    host.run(work, finish, ())


def test_jobs_share_the_cores_and_are_re_timed_when_one_starts_or_ends() -> None:
    loop, host = _host(2.0, overhead=1.0)           # one core for the replicas
    done: dict[str, float] = {}
    _job(loop, host, 1.0, done, "a")
    loop.at(0.5, _job, loop, host, 1.0, done, "b")
    loop.run(10.0)
    # a: 0.5 s alone, then half speed for its last 0.5 s of work -> 1.5 s.
    # b: half speed until a ends (0.5 s of work done), then full speed -> 2.0 s.
    assert abs(done["a"] - 1.5) < 1e-9 and abs(done["b"] - 2.0) < 1e-9
    assert host.busy == 0.0 and host.rate == 1.0


def test_no_slowdown_while_the_cores_suffice_and_none_without_a_host_limit() -> None:
    for cores in (4.0, None):
        loop, host = _host(cores)
        done: dict[str, float] = {}
        for name in "abc":
            _job(loop, host, 1.0, done, name)
        loop.run(10.0)
        assert done == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_a_cold_start_is_cpu_work_that_a_busy_host_stretches() -> None:
    from sim.profiles import parse_profiles
    from sim.replicas import SimProvider
    import numpy as np

    loop = EventLoop()
    profiles = parse_profiles({"host": {"cores": 1.0}, "models": {"m": {"latency_ms": {1: 1000},
                                                                        "cold_start_s": 1.0,
                                                                        "cold_start_sigma": 0.0}}})
    ready: list[float] = []
    provider = SimProvider(loop, profiles, np.random.default_rng(0), on_ready=lambda r: ready.append(loop.now),
                           on_drain=lambda r: None, on_done=lambda batch, r: None)
    done: dict[str, float] = {}
    _job(loop, provider.host, 1.0, done, "batch")        # a replica computing for 1 s on the only core
    loop.at(0.0, provider._spawn, "m", "serverless", "")
    loop.run(10.0)
    # Loading and the batch share the core: both take 2 s, and the replica says so.
    assert ready == [2.0] and done["batch"] == 2.0
    assert provider.replicas()[0].cold_start_s == 2.0
