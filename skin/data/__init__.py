"""The reading side of the data layer: staged shards -> local disk -> tf.data (``dataset``),
the image primitives (``images``), which images show the same lesion (``grouping``), where the
images came from (``provenance``), and a synthetic lesion folder for laptops and tests
(``synthetic``). The stage job, which writes the shards, is :mod:`skin.staging`."""
