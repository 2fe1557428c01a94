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
