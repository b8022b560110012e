"""How a kind-sim run ends: every Job complete, and the published model read back from the
bucket and summarised as ``skin run`` does.

:class:`Outcome` is a part of :class:`skin.kindsim.simulator.Simulator` (it uses the
simulator's ``jobs``, ``ended_pods``, ``cluster``, ``opts`` and ``started``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import yaml

from skin.kindsim import jobs as jobctl
from skin.kindsim.pods import PodConfigError


class Outcome:
    """The simulator's success path."""

    def _succeed(self) -> int:
        self.say("every Job complete: " + ", ".join(
            f"{j.name} {j.finished - j.started:.0f} s" for j in self.jobs.values()
            if j.kind == "Job"))
        code = 0
        if self.opts.fetch_model:
            code = self._publish_summary()
        counted = [(pod, key, exit_code) for pod, key, exit_code, action in self.ended_pods
                   if action in (jobctl.COUNT, jobctl.FAIL_INDEX, jobctl.FAIL_JOB)]
        if counted:
            print("kind-sim: the run completed, but pods failed in a way the Jobs count against "
                  "their back-off limits: " + ", ".join(f"{p} ({k}, exit {c})"
                                                        for p, k, c in counted),
                  file=sys.stderr, flush=True)
            return 1
        return code

    def _publish_summary(self) -> int:
        """Read the published model back from the bucket and summarise it as skin run does."""
        from skin import run as skin_run
        from skin.infra.config import parse_experiment

        found = self._experiment()
        if found is None:
            self.say("no experiment file (SKIN_CONFIG) or no STORAGE_EMULATOR_HOST in the "
                     "pods: not reading the model back")
            return 0
        exp_doc, storage_host, pod_env = found
        exp = parse_experiment(exp_doc, env=pod_env)  # SKIN_EXPERIMENT_NAME, SKIN_WORKERS
        os.environ["STORAGE_EMULATOR_HOST"] = storage_host
        try:
            version, model_dir = skin_run._fetch_model(exp, self.opts.out)
        except (FileNotFoundError, OSError) as e:
            print(f"kind-sim: every Job completed but no published model was found in "
                  f"{exp.models_uri}: {e}", file=sys.stderr, flush=True)
            return 1
        timings = {"total": time.monotonic() - self.started, "stage": 0.0, "tune": 0.0,
                   "retrain": 0.0}
        for job in self.jobs.values():
            component = (self.cluster.template_labels(job.obj)
                         .get("app.kubernetes.io/component", ""))
            key = {"stage": "stage", "chief": "tune", "retrain": "retrain"}.get(component)
            if key and job.started and job.finished:
                timings[key] = job.finished - job.started
        summary = skin_run._summary(exp, self.opts.out, version, model_dir, timings, None)
        print(summary.replace("skin run:", "skin kind-sim:", 1)
              .replace(f"{self.opts.out / 'logs'}/", f"{self.opts.out / 'logs'}/  (one per pod)"),
              flush=True)
        (self.opts.out / "published.json").write_text(json.dumps(
            {"version": version, "model_dir": str(model_dir),
             "metrics": json.loads((model_dir / "metrics.json").read_text())}, indent=2))
        return 0

    def _experiment(self) -> tuple[dict, str, dict[str, str]] | None:
        """The experiment document the pods mount, the storage URL as the host reaches it, and
        a pod's environment as the kubelet resolves it (the experiment's overrides)."""
        for job in self.jobs.values():
            template = job.obj["spec"]["template"]
            spec = template["spec"]
            ns = self.cluster.namespace(job.obj)
            pod = {"metadata": {"name": job.name, "namespace": ns,
                                "labels": dict(template.get("metadata", {}).get("labels") or {}),
                                "annotations": {}}, "spec": spec}
            for c in spec.get("containers", []):
                try:
                    env = self.cluster.container_env(c, pod, ns, "")
                except PodConfigError:
                    continue
                config, storage = env.get("SKIN_CONFIG"), env.get("STORAGE_EMULATOR_HOST")
                if not config or not storage:
                    continue
                for mount in c.get("volumeMounts") or []:
                    if not config.startswith(mount["mountPath"].rstrip("/") + "/"):
                        continue
                    vol = next(v for v in spec.get("volumes", []) if v["name"] == mount["name"])
                    cm = self.cluster.get("ConfigMap", (vol.get("configMap") or {}).get("name", ""))
                    if cm is None:
                        continue
                    key = config[len(mount["mountPath"].rstrip("/")) + 1:]
                    host = storage.split("://", 1)[-1].split(":")[0].split("/")[0]
                    for alias in self.cluster.host_aliases():
                        if host in alias["hostnames"]:
                            storage = storage.replace(host, alias["ip"], 1)
                    return yaml.safe_load(cm["data"][key]), storage, env
        return None
