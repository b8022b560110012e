"""Infrastructure every role shares: the experiment file and the environment (``config``,
``runtime``), the bucket (``storage`` over ``gcs``, the local ``emulator``), where each object
lives in it and what the documents there hold (``artifacts``, ``documents``), the Jobs'
deadlines (``deadlines``) and the one Kubernetes API call (``kube``)."""
