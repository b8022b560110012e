"""The published model: one trained model, or the mean of several, optionally over views.

:func:`inference_model` makes one model of several (``retrain.ensemble``: the mean of
their outputs), optionally averaged over the 8 dihedral views of the image
(``retrain.tta``: identity, flips, rotations by 90 degrees; a lesion has no
orientation). The views and their mean are two small registered layers,
``skin>DihedralViews`` and ``skin>ViewMean``: loading such a model with
``keras.models.load_model(path, safe_mode=True)`` needs ``import skin.model.inference`` first
(:mod:`skin.serving.contract` does it; Keras finds registered layers by name, so models saved
when they lived in ``skin.model.hypermodel`` load too).
"""

from __future__ import annotations

import keras

DIHEDRAL_VIEWS = 8


@keras.saving.register_keras_serializable(package="skin")
class DihedralViews(keras.layers.Layer):
    """``[B, S, S, C]`` -> ``[views * B, S, S, C]``: the images under the symmetries of the
    square, view-major (rows ``v*B .. v*B+B-1`` are view ``v``).

    The views, in order: identity, left-right flip, up-down flip, rotation by 180
    degrees (together: ``views=4``, the flips), then the transpose and its three flips
    (the rotations by 90 and 270 degrees and the two diagonal mirrors; ``views=8``, the
    whole dihedral group). ``views=2``: identity and left-right flip.
    """

    def __init__(self, views: int = DIHEDRAL_VIEWS, **kwargs):
        super().__init__(**kwargs)
        if views not in (1, 2, 4, 8):
            raise ValueError(f"views: {views!r} is not valid; expected 1, 2, 4 or 8")
        self.views = int(views)

    def build(self, input_shape):
        if self.views > 4 and input_shape[1] != input_shape[2]:
            raise ValueError(f"{self.views} dihedral views need square images, got {input_shape}")
        super().build(input_shape)

    def call(self, images):
        ops = keras.ops
        out = [images]
        if self.views >= 2:
            out.append(ops.flip(images, axis=2))
        if self.views >= 4:
            flipped = ops.flip(images, axis=1)
            out += [flipped, ops.flip(flipped, axis=2)]
        if self.views == 8:
            t = ops.transpose(images, (0, 2, 1, 3))
            flipped = ops.flip(t, axis=1)
            out += [t, ops.flip(t, axis=2), flipped, ops.flip(flipped, axis=2)]
        return ops.concatenate(out, axis=0) if len(out) > 1 else images

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        return (None if batch is None else batch * self.views, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "views": self.views}


@keras.saving.register_keras_serializable(package="skin")
class ViewMean(keras.layers.Layer):
    """``[views * B, ...]`` (view-major, as ``DihedralViews`` makes it) -> ``[B, ...]``: the
    mean over the views."""

    def __init__(self, views: int = DIHEDRAL_VIEWS, **kwargs):
        super().__init__(**kwargs)
        self.views = int(views)

    def call(self, x):
        ops = keras.ops
        if self.views == 1:
            return x
        stacked = ops.reshape(x, (self.views, -1, *x.shape[1:]))
        return ops.mean(stacked, axis=0)

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        return (None if batch is None else batch // self.views, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "views": self.views}


def _rename(model: keras.Model, name: str) -> keras.Model:
    """Nested models need distinct names; a trained model keeps its weights."""
    model.name = name
    return model


def inference_model(members: list[keras.Model], *, tta: bool = False,
                    views: int = DIHEDRAL_VIEWS) -> keras.Model:
    """The model to publish: the mean of ``members``' outputs and, with ``tta``, of
    ``views`` dihedral views of the image (``DihedralViews``); one output P(malignant).

    One member without TTA is returned as it is. Otherwise a functional model over the
    members: the views go through each member as one batch (``views * B`` images), the
    members' outputs are averaged (``Average``), then the views (``ViewMean``), so the
    output is the mean over members and views. The members must share the input shape
    (float 0..255 ``[S, S, 3]``); they are renamed ``member0``, ``member1`` ...
    """
    if not members:
        raise ValueError("inference_model needs at least one member")
    if len(members) == 1 and not tta:
        return members[0]
    shape = tuple(members[0].inputs[0].shape[1:])
    for i, m in enumerate(members):
        if tuple(m.inputs[0].shape[1:]) != shape:
            raise ValueError(f"member {i} takes {tuple(m.inputs[0].shape[1:])}, member 0 {shape}")
        _rename(m, f"member{i}")
    views = views if tta else 1
    inputs = keras.Input(shape, dtype="float32", name="image")
    x = DihedralViews(views, name="tta_views")(inputs) if views > 1 else inputs
    outputs = [m(x, training=False) for m in members]
    y = keras.layers.Average(name="ensemble_mean")(outputs) if len(outputs) > 1 else outputs[0]
    if views > 1:
        y = ViewMean(views, name="tta_mean")(y)
    name = ("skin_ensemble" if len(members) > 1 else "skin_cnn") + ("_tta" if views > 1 else "")
    return keras.Model(inputs, y, name=name)
