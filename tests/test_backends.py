"""The Backend contract, for every registered backend: one way to refuse unknown options and
precisions, GPU use and package facts owned by the backend, no backend facts elsewhere."""

import pytest

from hwnas.backends import BACKENDS, backend_available, get_backend
from hwnas.backends.base import Backend
from hwnas.devices import Device, list_devices
from hwnas.errors import UserError


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_refuses_unknown_options_and_precisions_alike(name):
    b = get_backend(name)
    assert isinstance(b, Backend) and b.name == name and b.packages and b.options
    bad = Device("t", name, b.precisions[0], 1, "", {"no_such_option": 1})
    with pytest.raises(UserError, match=rf"device t: unknown {b.title} option\(s\) "
                                        r"\['no_such_option'\]; known: "):
        b.check_device(bad)
    ok, why = backend_available(bad)
    assert not ok and "no_such_option" in why
    with pytest.raises(UserError, match=rf"precision 'int4' is not one the {b.title} backend"):
        b.check_device(Device("t", name, "int4", 1, "", {}))


def test_gpu_use_and_versions_come_from_the_backend():
    by_name = {d.name: d for d in list_devices()}
    for d in by_name.values():
        fp = d.fingerprint()
        b = get_backend(d.backend)
        assert fp["uses_gpu"] == b.uses_gpu(d) == d.name.startswith("gpu-")
        assert b.version(fp["packages"]) == next(
            (fp["packages"][p] for p in b.packages if p in fp["packages"]), None)


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="unknown backend 'nope'"):
        get_backend("nope")


def test_ort_memory_pattern_option_reaches_the_session(tmp_path):
    import dataclasses

    from torch import nn

    from hwnas.backends import compile_model
    from hwnas.devices import load_device
    from hwnas.export import export_onnx

    path = export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), (1, 3, 8, 8),
                       tmp_path / "m.onnx")
    base = load_device("cpu-ort-fp32")
    for value in (True, False):
        dev = dataclasses.replace(base, options={**base.options, "memory_pattern": value})
        r = compile_model(path, dev)
        try:
            assert r.session.get_session_options().enable_mem_pattern is value
            assert r.run(r.random_feed())  # and the model still runs
        finally:
            r.close()


def test_ort_disabled_optimizers_option_reaches_the_session(tmp_path):
    """A transformer left out by name: Conv + ReLU stay two kernels without the fusion."""
    import dataclasses

    from torch import nn

    from hwnas.backends import compile_model
    from hwnas.devices import load_device
    from hwnas.export import export_onnx

    path = export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), (1, 3, 8, 8),
                       tmp_path / "m.onnx")
    base = load_device("cpu-ort-fp32")
    kernels = {}
    for off in (None, "ConvActivationFusion"):
        opts = {**base.options, "profile_nodes": True, "graph_optimization": "extended",
                **({"disabled_optimizers": off} if off else {})}
        r = compile_model(path, dataclasses.replace(base, options=opts))
        try:
            r.run(r.random_feed())
            kernels[off] = [name for name, _ in r.node_profile()]
        finally:
            r.close()
    assert kernels[None] == ["/0/Conv"]  # fused
    assert kernels["ConvActivationFusion"] == ["/0/Conv", "/1/Relu"]
