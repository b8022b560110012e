"""skin.model.weights / `skin weights import`: PyTorch checkpoints read without PyTorch (and
without running code from them), converted to Keras, and proof that the conversion is right:
the shipped EfficientNet-Lite0 checkpoint classifies real photographs into plausible ImageNet
classes, and its batch-norm statistics match the activations of natural images; a wrong
layout or a wrong input scaling fails both."""

from __future__ import annotations

import pickle
import sys

import keras
import numpy as np
import pytest

import torch_format
from skin.cli import main
from skin.model import checkpoint as ckpt
from skin.model import lite0
from skin.model import weights as W

BACKBONE = "efficientnet_lite0"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.fixture(scope="module")
def checkpoint():
    return W.packaged_checkpoint()


@pytest.fixture(scope="module")
def state(checkpoint):
    return ckpt.read_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def classifier(state):
    """Lite0 with the 1000-class classifier, converted from the shipped checkpoint."""
    return W.convert(state, BACKBONE, include_top=True)


def photo(name: str, size: int = 224) -> np.ndarray:
    """A scikit-image sample photograph, bicubic-resized to size x size, 0..255 float."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(getattr(data, name)()[..., :3])
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype="float32")


PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat")


def bn_agreement(net: keras.Model, images: np.ndarray) -> float:
    """Median over the batch-norm layers of the correlation between each channel's running
    mean and the mean of that channel's input on ``images`` (natural photographs)."""
    norms = [la for la in net.layers if isinstance(la, keras.layers.BatchNormalization)]
    probe = keras.Model(net.input, [la.input for la in norms])
    acts = probe.predict(images, verbose=0)
    corr = []
    for la, a in zip(norms, acts):
        seen = a.reshape(-1, a.shape[-1]).mean(axis=0)
        corr.append(np.corrcoef(seen, la.moving_mean.numpy())[0, 1])
    return float(np.median(corr))


def top(classifier, images):
    p = classifier.predict(images, verbose=0)
    return p.argmax(axis=1), p


# ---------------------------------------------------------------------------
# Reading


def test_the_shipped_checkpoint_is_read_without_torch(state):
    assert "torch" not in sys.modules
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert state["_bn0.running_var"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert not any("_se_" in k for k in state)  # Lite: no squeeze-excitation
    assert all(np.isfinite(v).all() for v in state.values())


def test_zip_and_legacy_checkpoints_written_here_read_back_the_same(state, tmp_path):
    arrays = {k: np.asarray(v) for k, v in list(state.items())[:12]}
    arrays["half"] = np.arange(6, dtype="float16").reshape(2, 3)
    arrays["scalar"] = np.array(7, dtype="int64")
    torch_format.save_zip(arrays, tmp_path / "zip.pth")
    torch_format.save_legacy(arrays, tmp_path / "legacy.pth")
    for name in ("zip.pth", "legacy.pth"):
        back = ckpt.read_checkpoint(tmp_path / name)
        assert list(back) == list(arrays)
        for k, v in arrays.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, (name, k)
            np.testing.assert_array_equal(back[k], v)


def test_the_zip_format_of_the_whole_checkpoint_converts_like_the_legacy_one(
        state, classifier, tmp_path):
    torch_format.save_zip(dict(state), tmp_path / "lite0.pth")
    net = W.convert(ckpt.read_checkpoint(tmp_path / "lite0.pth"), BACKBONE, include_top=True)
    for a, b in zip(net.get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_safetensors_file_converts_like_the_pytorch_checkpoint(state, classifier, tmp_path,
                                                                 capsys):
    """The same state dict saved by the safetensors package: read back bit for bit, and
    `skin weights import` of it writes the weights the .pth import gives."""
    from safetensors.numpy import save_file

    save_file({k: np.require(v, requirements="C") for k, v in state.items()},
              str(tmp_path / "lite0.safetensors"))
    back = ckpt.read_checkpoint(tmp_path / "lite0.safetensors")
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)
    out = tmp_path / "lite0.weights.h5"
    assert main(["weights", "import", "--from", str(tmp_path / "lite0.safetensors"),
                 "--backbone", BACKBONE, "--out", str(out), "--include-top"]) == 0, \
        capsys.readouterr().err
    net = W.keras_network(BACKBONE, include_top=True)
    net.load_weights(str(out))
    for a, b in zip(net.get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_corrupt_safetensors_file_exits_2_naming_it(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["weights", "import", "--from", str(bad), "--backbone", BACKBONE,
                 "--out", str(tmp_path / "x.weights.h5")]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "not a readable safetensors file" in err
    assert not (tmp_path / "x.weights.h5").exists()


@pytest.mark.parametrize("fmt", ["legacy", "zip", "first-pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(fmt, tmp_path, capsys):
    import os

    marker = tmp_path / "pwned"
    payload = torch_format.malicious_state(os.system, f"touch {marker}")
    # The attack works: a plain pickle.load runs the command.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pth"
    if fmt == "zip":
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
    elif fmt == "legacy":
        with open(path, "wb") as f:
            for head in (ckpt.LEGACY_MAGIC, ckpt.LEGACY_PROTOCOL, {"little_endian": True}):
                pickle.dump(head, f, protocol=2)
            f.write(payload)
    else:  # the payload where the magic number should be
        path.write_bytes(payload)
    with pytest.raises(ckpt.CheckpointError, match=r"refused the global (posix|os)\.system"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()

    code = main(["weights", "import", "--from", str(path), "--backbone", BACKBONE,
                 "--out", str(tmp_path / "out.weights.h5")])
    err = capsys.readouterr().err
    assert code == 2 and "refused the global" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "out.weights.h5").exists()


def test_other_globals_and_non_checkpoints_are_refused(tmp_path):
    import collections

    path = tmp_path / "eval.pth"
    path.write_bytes(torch_format.malicious_state(eval, "1 + 1"))
    with pytest.raises(ckpt.CheckpointError, match=r"refused the global (__builtin__|builtins)\.eval"):
        ckpt.read_checkpoint(path)
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=2))
    with pytest.raises(ckpt.CheckpointError, match="magic number is missing"):
        ckpt.read_checkpoint(path)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="not a readable PyTorch checkpoint"):
        ckpt.read_checkpoint(path)


# ---------------------------------------------------------------------------
# Layouts and batch norm, against numpy references written the PyTorch way


def _torch_conv(x_nchw, w_oihw, stride=1, groups=1):
    """PyTorch's conv2d (cross-correlation, no padding) in numpy."""
    n, c, h, wd = x_nchw.shape
    o, cg, kh, kw = w_oihw.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    per = o // groups
    for g in range(groups):
        xs = x_nchw[:, g * cg:(g + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                patch = xs[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                out[:, g * per:(g + 1) * per, i, j] = np.einsum(
                    "nchw,ochw->no", patch, w_oihw[g * per:(g + 1) * per])
    return out


def _convert_one(layer, state, prefix="m", eps=1e-3):
    layer.set_weights(W.keras_values(layer, prefix, state, set(), source_eps=eps, what="t"))


def test_conv_depthwise_and_dense_layouts_match_pytorch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 7, 4)).astype("float32")  # NHWC
    x_nchw = x.transpose(0, 3, 1, 2)

    conv = keras.layers.Conv2D(5, (3, 2), padding="valid", use_bias=False)
    conv.build(x.shape)
    w = rng.normal(size=(5, 4, 3, 2)).astype("float32")  # OIHW, not square: H and W differ
    _convert_one(conv, {"m.weight": w})
    np.testing.assert_allclose(np.asarray(conv(x)).transpose(0, 3, 1, 2), _torch_conv(x_nchw, w),
                               rtol=1e-4, atol=1e-4)

    dw = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False)
    dw.build(x.shape)
    w = rng.normal(size=(4, 1, 3, 3)).astype("float32")  # (C, 1, kh, kw)
    _convert_one(dw, {"m.weight": w})
    np.testing.assert_allclose(np.asarray(dw(x)).transpose(0, 3, 1, 2),
                               _torch_conv(x_nchw, w, stride=2, groups=4), rtol=1e-4, atol=1e-4)

    dense = keras.layers.Dense(3)
    dense.build((2, 4))
    w, b = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=3).astype("float32")
    _convert_one(dense, {"m.weight": w, "m.bias": b})
    v = x[:, 0, 0, :]
    np.testing.assert_allclose(np.asarray(dense(v)), v @ w.T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source_eps", [1e-5, 1e-3, 1e-2])
def test_batch_norm_gives_the_pytorch_output_for_its_epsilon(source_eps):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 3, 6)).astype("float32")
    gamma, beta, mean = (rng.normal(size=6).astype("float32") for _ in range(3))
    # Small variances show epsilon; with a source epsilon of 1e-5 the first two cannot be
    # expressed as a variance for Keras's 1e-3 (gamma absorbs the difference).
    var = np.array([1e-5, 1e-4, 0.01, 0.1, 1.0, 3.0], "float32")
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    bn.build(x.shape)
    _convert_one(bn, {"m.weight": gamma, "m.bias": beta, "m.running_mean": mean,
                      "m.running_var": var, "m.num_batches_tracked": np.array(5)}, eps=source_eps)
    expected = (x - mean) / np.sqrt(var + source_eps) * gamma + beta
    np.testing.assert_allclose(np.asarray(bn(x, training=False)), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Names that do not map, missing tensors, shapes: exit 2 naming the tensor


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("_blocks.7._bn1.running_mean"),
     "tensor '_blocks.7._bn1.running_mean' is missing"),
    (lambda s: s.__setitem__("_blocks.3._se_reduce.weight", np.zeros((4, 80, 1, 1), "float32")),
     "tensor '_blocks.3._se_reduce.weight' does not map to any layer of efficientnet_lite0"),
    (lambda s: s.__setitem__("_conv_head.weight", np.zeros((1280, 320, 3, 3), "float32")),
     r"tensor '_conv_head.weight' has shape \[1280, 320, 3, 3\]; Keras layer 'conv_head' needs "
     r"\[1280, 320, 1, 1\]"),
])
def test_a_checkpoint_that_does_not_fit_exits_2_naming_the_tensor(state, change, message,
                                                                   tmp_path, capsys):
    bad = dict(state)
    change(bad)
    torch_format.save_zip(bad, tmp_path / "bad.pth")
    out = tmp_path / "out.weights.h5"
    code = main(["weights", "import", "--from", str(tmp_path / "bad.pth"), "--backbone",
                 BACKBONE, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_bad_arguments_exit_2(checkpoint, tmp_path, capsys):
    assert main(["weights", "import", "--from", str(checkpoint), "--backbone", "resnet50",
                 "--out", str(tmp_path / "x.weights.h5")]) == 2
    assert "--backbone: 'resnet50' is not valid" in capsys.readouterr().err
    assert main(["weights", "import", "--from", str(checkpoint), "--backbone", BACKBONE,
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert "expected a name ending in .weights.h5" in capsys.readouterr().err
    assert main(["weights", "import", "--from", str(tmp_path / "nope.pth"), "--backbone",
                 BACKBONE, "--out", str(tmp_path / "x.weights.h5")]) == 2
    assert "is not a file" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Proof that the conversion is right


def test_imagenet_photographs_get_their_classes(classifier):
    images = np.stack([photo("chelsea"), photo("coffee")])
    cls, p = top(classifier, images)
    # The notes' figures (TF-style padding, (x - 127) / 128): 285 at 0.77, 967 at 0.90.
    assert cls[0] == 285 and p[0, 285] > 0.72, (cls[0], p[0].max())
    assert p[0, list(CAT_CLASSES)].sum() > 0.9
    assert cls[1] == ESPRESSO and p[1, ESPRESSO] > 0.88, (cls[1], p[1].max())
    assert p[1, ESPRESSO] + p[1, CUP] > 0.9


def test_batch_norm_statistics_match_natural_images(classifier):
    images = np.stack([photo(n) for n in PHOTOS])
    assert bn_agreement(classifier, images) > 0.9


def wrongly_converted(classifier, state, how: str) -> keras.Model:
    """The classifier with a layout bug: ``reshape`` (kernels reshaped to Keras's shape
    instead of transposed) or ``swap_hw`` (OIHW read as OIWH: height and width swapped)."""
    wrong = keras.models.clone_model(classifier)
    wrong.set_weights(classifier.get_weights())
    for layer in wrong.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                  keras.layers.Dense)):
            continue
        values = layer.get_weights()
        if how == "reshape":
            values[0] = state[lite0.torch_prefix(layer.name) + ".weight"].reshape(values[0].shape)
        elif values[0].ndim == 4 and values[0].shape[0] > 1:
            values[0] = values[0].transpose(1, 0, 2, 3)
        layer.set_weights(values)
    return wrong


def classified(classifier, images) -> bool:
    """The check of test_imagenet_photographs_get_their_classes, as a yes/no."""
    cls, p = top(classifier, images)
    return bool(cls[0] == 285 and p[0, 285] > 0.72 and cls[1] == ESPRESSO
                and p[1, ESPRESSO] > 0.88)


@pytest.mark.slow
def test_a_wrong_layout_or_scaling_fails_both_checks(classifier, state):
    """Kernels reshaped instead of transposed, or 0..1 pixels where the network expects
    0..255: neither classifies the photographs nor matches the batch-norm statistics."""
    chelsea_coffee = np.stack([photo("chelsea"), photo("coffee")])
    natural = np.stack([photo(n) for n in PHOTOS])
    assert classified(classifier, chelsea_coffee)  # the checks pass on the right conversion

    reshaped = wrongly_converted(classifier, state, "reshape")
    assert not classified(reshaped, chelsea_coffee)
    assert bn_agreement(reshaped, natural) < 0.5  # measured: 0.01

    assert not classified(classifier, chelsea_coffee / 255.0)
    assert bn_agreement(classifier, natural / 255.0) < 0.9  # measured: 0.79 (right: 0.97)


@pytest.mark.slow
def test_kernels_with_height_and_width_swapped_fail_the_classification(classifier, state):
    """A subtler layout bug: the photographs' classes catch it (the espresso is lost),
    batch-norm means cannot (natural images look alike transposed: 0.975 here)."""
    swapped = wrongly_converted(classifier, state, "swap_hw")
    assert not classified(swapped, np.stack([photo("chelsea"), photo("coffee")]))


def test_the_network_is_lite0(state):
    net = lite0.build(224)
    assert net.output.shape == (None, 7, 7, 1280)
    learned = sum(v.size for k, v in state.items()
                  if not k.startswith("_fc.") and k.endswith((".weight", ".bias")))
    assert sum(int(np.prod(w.shape)) for w in net.trainable_weights) == learned
    kinds = {type(la).__name__ for la in net.layers}
    assert "Multiply" not in kinds  # no squeeze-excitation
    relus = [la for la in net.layers if isinstance(la, keras.layers.ReLU)]
    assert relus and all(la.max_value == 6.0 for la in relus)
    assert all(la.epsilon == 1e-3 for la in net.layers
               if isinstance(la, keras.layers.BatchNormalization))
    assert len([la for la in net.layers if isinstance(la, keras.layers.Add)]) == 9


def test_the_network_and_the_import_are_pure_keras():
    """No TensorFlow import in skin.model.lite0, skin.model.weights, skin.model.backbone: they run on Keras's
    JAX backend too (the GPU machines have no TensorFlow)."""
    import ast
    from pathlib import Path

    import skin

    for name in ("lite0.py", "weights.py", "backbone.py"):
        tree = ast.parse((Path(skin.__file__).parent / "model" / name).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "tensorflow" for m in imported), (name, imported)
