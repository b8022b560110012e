"""The stage job, the writing side of the data layer: labelled images from a source
(``sources``) -> checked, deduplicated, grouped split (``stage``) -> TFRecord shards and
``manifest.json`` in the bucket (``shards``). :mod:`skin.data` reads what it writes."""
