"""``make kind-sim``: the rendered ``k8s/kind`` overlay's pods, run by podman as a cluster would.

No Kubernetes API server runs here, but podman runs pod specs (``podman kube
play``). The simulator reads the rendered YAML and plays the control plane's
part only:

- :mod:`skin.kindsim.pods`: a pod per Deployment replica and per Job
  completion (index), with what the Job controller and the kubelet add: the
  completion index annotation, the kubelet's environment resolution
  (``valueFrom``, ``$(VAR)``, Service links), Secret and service-account-token
  volumes, Service names resolvable on the pod network;
- :mod:`skin.kindsim.jobs`: what the Job controller decides when a pod ends
  (``podFailurePolicy``, ``backoffLimit``, ``backoffLimitPerIndex``);
- :mod:`skin.kindsim.apiserver`: just enough of the Kubernetes API for the
  chief's GET and PATCH of the suspended retrain Job (with the RBAC rules of
  the rendered Roles);
- :mod:`skin.kindsim.simulator`: podman, the control loop, the report.

Everything else (commands, arguments, environment, volumes, security
contexts, resources, ports) comes from the rendered objects unchanged.
"""
