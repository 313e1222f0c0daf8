"""`runtime.compile`: the torch.compile'd adapted image forward gives the eager results (values and
gradients) within float tolerance. The quick test traces with the "aot_eager" backend (graph capture
and autograd, no code generation); the inductor one generates and compiles C++ and is slow."""

from __future__ import annotations

import pytest
import torch

from aaclip_core.recipe import load_recipe
from aaclip_core.training.groups import set_trainable


def _forward_and_grads(model, images):
    """Patch maps, detection embedding and the image-side gradients of a simple objective."""
    set_trainable(model, 2)
    model.zero_grad(set_to_none=True)
    seg, det = model.encode_image(images)
    (sum((s * s.roll(1, dims=1)).sum() for s in seg) + det.pow(3).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.image_adapter.named_parameters()}
    return [s.detach() for s in seg], det.detach(), grads


def _recording(backend: str, graphs: list):
    """``backend`` as torch.compile runs it, keeping each graph dynamo hands it: a compile that fell
    back to eager (dynamo gave up on the function) hands over none."""
    from torch._dynamo.backends.registry import lookup_backend

    compile_graph = lookup_backend(backend)

    def record(gm, example_inputs):
        graphs.append(gm)
        return compile_graph(gm, example_inputs)

    return record


def _assert_same_as_eager(make_model, backend: str) -> None:
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    eager = make_model()
    compiled = make_model()
    graphs: list = []
    torch._dynamo.reset()
    compiled.compile_image_path(_recording(backend, graphs))
    assert compiled.compiled and not eager.compiled
    seg_e, det_e, grads_e = _forward_and_grads(eager, images)
    seg_c, det_c, grads_c = _forward_and_grads(compiled, images)
    # A graph was compiled, and it holds the adapter's work (its linear layers), not a stub.
    assert graphs, "torch.compile ran the forward eagerly: no graph reached the backend"
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_module", "call_method")]
    assert sum("linear" in op for op in ops) >= 4, ops[:40]
    for a, b in zip(seg_e, seg_c, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(det_c, det_e, atol=1e-5, rtol=1e-5)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_forward_and_gradients_equal_eager(make_model):
    _assert_same_as_eager(make_model, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_forward_and_gradients_equal_eager(make_model):
    _assert_same_as_eager(make_model, "inductor")


def test_runtime_compile_switches_the_built_model():
    from aaclip_core.model import build_model

    assert build_model(load_recipe("demo", ["runtime.compile=true"])[0], "cpu").compiled
    assert not build_model(load_recipe("demo")[0], "cpu").compiled


def test_frozen_weights_compile_equals_eager_and_refuses_changed_weights(make_model):
    """Test and predict fold the weights into the inference graph (inductor freezing): the maps equal
    eager ones; calls with autograd run eager; a weight changed afterwards raises instead of
    returning results of the old weights."""
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    eager, frozen = make_model(), make_model()
    frozen.compile_image_path("inductor", freeze_weights=True)
    with torch.no_grad():
        seg_e, det_e = eager.encode_image(images)
        seg_f, det_f = frozen.encode_image(images)
    for a, b in zip(seg_e, seg_f, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(det_f, det_e, atol=1e-5, rtol=1e-5)
    set_trainable(frozen, 2)
    set_trainable(eager, 2)
    assert torch.equal(frozen.encode_image(images)[1], eager.encode_image(images)[1])  # autograd on: eager
    with torch.no_grad():
        frozen.image_adapter["layer_adapters"][0].fc[0].weight.mul_(2)
        with pytest.raises(RuntimeError, match="weights changed"):
            frozen.encode_image(images)


def test_restored_models_compile_with_frozen_weights_and_built_ones_do_not(demo_recipe):
    """Only a model restored for test/predict (weights final) gets the frozen inference graph."""
    from aaclip_core.model import build_model

    recipe = load_recipe("demo", ["runtime.compile=true"])[0]
    assert build_model(recipe, "cpu", final_weights=True)._frozen_weights
    assert not build_model(recipe, "cpu")._frozen_weights
