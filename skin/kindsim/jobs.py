"""What the Job controller decides when one of a Job's pods ends.

The rules of batch/v1 Job that matter to a run (Kubernetes 1.29+):

- ``podFailurePolicy.rules`` are tried in order; the first rule whose
  ``onExitCodes`` (``In``/``NotIn``, optionally for one ``containerName``;
  exit code 0 never matches) or ``onPodConditions`` matches decides:
  ``FailJob`` (the Job fails now), ``FailIndex`` (this index fails),
  ``Ignore`` (the pod is replaced and not counted) or ``Count``;
- a failure no rule matches is counted;
- counted failures beyond ``backoffLimitPerIndex`` fail the index (Indexed
  Jobs that set it), else beyond ``backoffLimit`` (default 6) fail the Job;
- a failed pod is replaced after an exponential back-off (10 s, 20 s, ...,
  capped at 6 min; the simulator scales it down).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BACKOFF_LIMIT = 6
BACKOFF_BASE_S, BACKOFF_CAP_S = 10.0, 360.0

FAIL_JOB, FAIL_INDEX, IGNORE, COUNT = "FailJob", "FailIndex", "Ignore", "Count"


@dataclass(frozen=True)
class PodEnd:
    """How a pod ended: each container's exit code and the pod's conditions set to True."""

    exit_codes: dict[str, int]
    conditions: frozenset[str] = frozenset()

    @property
    def succeeded(self) -> bool:
        return all(code == 0 for code in self.exit_codes.values())

    @property
    def exit_code(self) -> int:
        """The first non-zero exit code (what a report shows), 0 if none."""
        return next((c for c in self.exit_codes.values() if c != 0), 0)


def _rule_matches(rule: dict, end: PodEnd) -> bool:
    on_codes = rule.get("onExitCodes")
    if on_codes:
        values = set(on_codes.get("values") or [])
        container = on_codes.get("containerName")
        operator = on_codes.get("operator", "In")
        for name, code in end.exit_codes.items():
            if code == 0 or (container and name != container):
                continue
            if (code in values) == (operator == "In"):
                return True
        return False
    for condition in rule.get("onPodConditions") or []:
        if str(condition.get("status", "True")) == "True" and condition.get("type") in end.conditions:
            return True
    return False


def failure_action(job_spec: dict, end: PodEnd) -> tuple[str, str]:
    """The action for a failed pod and why: (``FailJob``|``FailIndex``|``Ignore``|``Count``, reason)."""
    for i, rule in enumerate((job_spec.get("podFailurePolicy") or {}).get("rules") or []):
        if _rule_matches(rule, end):
            return rule["action"], f"podFailurePolicy rule {i} ({rule['action']})"
    return COUNT, "no podFailurePolicy rule matched (counted)"


def backoff_limit(job_spec: dict) -> tuple[int, bool]:
    """(limit, per_index): the counted failures a Job (or each of its indexes) may have."""
    if job_spec.get("backoffLimitPerIndex") is not None:
        return int(job_spec["backoffLimitPerIndex"]), True
    return int(job_spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)), False


def replacement_delay(counted_failures: int, scale: float) -> float:
    """The Job controller's back-off before the next pod, times ``scale``."""
    if counted_failures <= 0:
        return 0.0
    return min(BACKOFF_BASE_S * 2 ** (counted_failures - 1), BACKOFF_CAP_S) * scale


def completion_indexes(job_spec: dict) -> list[int | None]:
    """The pods a Job runs side by side: one per index for Indexed Jobs, else ``parallelism``."""
    completions = int(job_spec.get("completions", 1) or 1)
    if job_spec.get("completionMode") == "Indexed":
        return list(range(completions))
    return [None] * min(completions, int(job_spec.get("parallelism", 1) or 1))
