"""Using a published model: the serving contract between retrain and predict (``contract``),
``skin evaluate`` and ``skin predict`` (``evaluate``), the scoring maths (``scoring``), the
clinical reader's figures (``clinical``) and how every report writes numbers
(``formatting``)."""
