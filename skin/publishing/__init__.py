"""The retrain job: train the best configuration's members (``training``), publish a version
and ``LATEST`` (``retrain``, ``publish``), and write what a reader of the version gets: the
model card (``model_card``), the plots (``plots``) and the run report (``report``,
``run_report``)."""
