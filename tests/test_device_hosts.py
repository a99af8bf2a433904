"""Each host's own devices ([12] B): the mesh takes as many devices of every host, and the
memory checks of the device-resident cache ask this host's devices, never host 0's.

The per-host pick and the checks run on fake devices (as a pod's would look from one host);
the 2-process test runs this module as a script in 2 processes x 2 CPU devices.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tests import multihost
from vqt_jax import cache as cache_lib
from vqt_jax import device_cache
from vqt_jax.training import mesh as mesh_lib
from vqt_jax.training import stacked

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class _Client:
    index: int

    def process_index(self) -> int:
        return self.index


@dataclasses.dataclass(frozen=True)
class _Device:
    """A device as a host of a pod sees it: another host's cannot report its memory."""

    id: int
    process_index: int
    client: _Client
    limit: int = 16 * GIB
    platform: str = "tpu"
    device_kind: str = "fake TPU"

    def memory_stats(self) -> dict[str, int]:
        if self.process_index != self.client.process_index():
            raise RuntimeError("memory_stats of a device another host owns")
        return {"bytes_limit": self.limit}


def _pod(per_host: list[int], me: int = 0, limits: dict[int, int] | None = None):
    client, devices = _Client(me), []
    for p, count in enumerate(per_host):
        for _ in range(count):
            i = len(devices)
            devices.append(_Device(i, p, client, (limits or {}).get(i, 16 * GIB)))
    return devices


def _fake_hosts(monkeypatch, devices):
    monkeypatch.setattr(jax, "devices", lambda: devices)
    monkeypatch.setattr(jax, "process_count", lambda: len({d.process_index for d in devices}))


def test_num_devices_takes_as_many_of_every_hosts_devices(monkeypatch):
    devices = _pod([4, 4, 4, 4])
    _fake_hosts(monkeypatch, devices)
    mesh = mesh_lib.make_mesh(8)
    assert [d.id for d in mesh.devices.flat] == [0, 1, 4, 5, 8, 9, 12, 13]
    assert [d.id for d in mesh_lib.make_mesh(4).devices.flat] == [0, 4, 8, 12]
    assert mesh_lib.make_mesh(0).devices.size == 16
    assert mesh_lib.make_mesh(16).devices.size == 16
    for n in (2, 6, 9):
        with pytest.raises(ValueError, match=f"num_devices={n} must be a multiple of the 4"):
            mesh_lib.make_mesh(n)
    with pytest.raises(ValueError, match="only 16 TPU devices"):
        mesh_lib.make_mesh(20)


def test_num_devices_refuses_a_host_without_enough_devices(monkeypatch):
    _fake_hosts(monkeypatch, _pod([3, 1]))
    assert [d.id for d in mesh_lib.make_mesh(2).devices.flat] == [0, 3]
    with pytest.raises(ValueError, match=r"takes 2 devices of each of the 2 hosts.*\{0: 3, 1: 1\}"):
        mesh_lib.make_mesh(4)


def test_one_host_takes_its_first_devices():
    mesh = mesh_lib.make_mesh(3)
    assert list(mesh.devices.flat) == jax.devices()[:3]


def _spec(share_gib: float, devices: int) -> cache_lib.Spec:
    """A cache of one float32 field of which each of `devices` holds about `share_gib` GiB
    (nothing is allocated: a spec only)."""
    n = 1024
    return cache_lib.Spec("kv", n, {"k": ((int(share_gib * GIB * devices / n / 4),), "float32")})


@pytest.mark.parametrize("me", [0, 1])
def test_memory_checks_ask_this_hosts_devices_and_take_the_least(me):
    """Host 1's devices are small (4 GiB; the others 16 GiB). Each host answers for its own
    devices, the least of them: host 1 refuses what host 0 accepts (the callers combine the
    answers with `hosts.all_agree`, so both then refuse). Asking device 0 of the mesh, as
    these checks did, fails on host 1 and let it accept."""
    devices = _pod([2, 2], me=me, limits={2: 4 * GIB, 3: 16 * GIB})
    mesh = Mesh(np.asarray(devices), ("data",))
    assert device_cache.local_memory_limit(mesh) == (16 if me == 0 else 4) * GIB
    spec = _spec(3, 4)  # over half of 4 GiB, under half of 16 GiB
    why = device_cache.why_not(spec, ["k"], mesh, batch_size=8)
    if me == 0:
        assert why is None
    else:
        assert why is not None and "4.00 GiB" in why and "fake TPU" in why, why

    class Compiled:
        def memory_analysis(self):
            return type("M", (), dict(argument_size_in_bytes=4 * GIB, output_size_in_bytes=0,
                                      temp_size_in_bytes=0, alias_size_in_bytes=0))

    why = stacked.fits(Compiled(), mesh)
    assert (why is None) == (me == 0), why


def _worker(process_id: int, port: int) -> None:
    """One process of the 2-process test: the mesh of `num_devices=2` and a gather over it."""
    multihost.initialize(process_id, port)
    import jax.numpy as jnp  # noqa: PLC0415

    from vqt_jax import hosts  # noqa: PLC0415

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = mesh_lib.make_mesh(2)
    assert [d.process_index for d in mesh.devices.flat] == [0, 1], mesh.devices
    assert mesh.local_devices == [jax.local_devices()[0]], mesh.local_devices
    # CPU devices report no memory: both hosts find the cache fits, and agree.
    spec = cache_lib.Spec("kv", 9, {"k": ((3,), "float32")})
    assert hosts.all_agree(device_cache.why_not(spec, ["k"], mesh, 4) is None)
    # The ring gather across the hosts' devices.
    rng = np.random.default_rng(0)
    host = cache_lib.Cache(spec, {"k": rng.normal(size=(9, 3)).astype(np.float32)},
                           np.arange(9, dtype=np.int32))
    dev = device_cache.upload(host, mesh, ["k"])
    index = np.array([8, 8, 0, 2, 4, 6, 1, 7])
    out = jax.jit(dev.gather)(dev.arrays, jnp.asarray(index, jnp.int32))
    for name, full in (("k", host.arrays["k"]), ("label", host.labels)):
        for shard in out[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[index][shard.index])


def test_two_hosts_take_one_device_each_and_gather_across_them():
    proc = multihost.launch("test_device_hosts", timeout=240)
    assert proc.returncode == 0, proc.stdout[-5000:]


if __name__ == "__main__":
    multihost.run_two(_worker, int(sys.argv[1]))
