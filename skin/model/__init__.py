"""The model: the searched from-scratch CNN as a keras-tuner ``HyperModel`` (``hypermodel``)
over the space of the experiment file (``space``), the optional pretrained backbones
(``backbone``, ``lite0``) and their ImageNet weights read without PyTorch (``weights``,
``checkpoint``), and the published model as one predictor (``inference``)."""
