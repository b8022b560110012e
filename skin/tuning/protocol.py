"""What chief and workers say to each other beyond keras-tuner's own gRPC messages.

The wire is keras-tuner's ``OracleService`` (``keras_tuner/protos``): a stock
keras-tuner stub reaches our chief once it sends the metadata below. What the
stock messages cannot carry travels as gRPC metadata:

==================  ===========  ==========================================================
key                 direction    value
==================  ===========  ==========================================================
``authorization``   request      ``Bearer <the experiment's token>`` on every call (auth.py)
``skin-worker``     request      the caller's tuner id (``tuner3``), required on every call
``skin-attempt``    both         which attempt of a trial (CreateTrial answers it; Update
                                 and End must repeat it), so a reclaimed attempt cannot end
                                 a trial
``skin-report``     request      ``epoch``: an UpdateTrial that only reports progress and
                                 renews the lease (its metrics are not the trial's result);
                                 ``heartbeat``: renews the lease mid-epoch, records nothing;
                                 ``release``: the worker was preempted (SIGTERM) and hands the
                                 trial back; ``step`` = epochs finished and in the bucket. The
                                 trial is re-queued at once, not counted as a failed attempt;
                                 on EndTrial, ``watchdog``: the worker's watchdog ends a hung
                                 trial (failed) just before the process exits (watchdog.py)
``skin-epochs``     request      EndTrial and release: ``<first>:<last>``, the epoch index the
                                 worker resumed the trial at and the epochs it finished (what
                                 epoch reports lost while the chief was away leave out)
``skin-search``     trailing     ``running`` | ``finished`` | ``failed``
``skin-reason``     trailing     why the search ended (ASCII, shortened)
``skin-lease``      trailing     ``lost``: the caller no longer holds the trial
``skin-message``    request      EndTrial of a failed trial: the error (the Trial message has
                                 no ``message`` field)
==================  ===========  ==========================================================

Errors (the oracle raises :class:`LeaseLost`, :class:`SearchStopped`, :class:`Refused`;
the servicer turns them into status codes): a lost lease or an ended search is
``FAILED_PRECONDITION`` with the trailing keys above; a chief that cannot save its state answers
``UNAVAILABLE``, which workers retry like a chief that is restarting. A call
without the token is ``UNAUTHENTICATED``; one without a valid worker id or
attempt ``PERMISSION_DENIED``; a report the chief will not take (metrics not
finite or out of range, other hyperparameters than issued) ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

WORKER = "skin-worker"
ATTEMPT = "skin-attempt"
REPORT = "skin-report"
SEARCH = "skin-search"
REASON = "skin-reason"
LEASE = "skin-lease"
MESSAGE = "skin-message"
EPOCHS = "skin-epochs"

REPORT_EPOCH = "epoch"
REPORT_HEARTBEAT = "heartbeat"  # mid-epoch: renews the lease, records nothing
REPORT_RELEASE = "release"  # preempted: the trial goes back to the queue (preempt.py)
REPORT_WATCHDOG = "watchdog"  # EndTrial from a hung worker's watchdog (watchdog.py)
LEASE_LOST = "lost"


def parse_epochs(value: str | None) -> tuple[int, int] | None:
    """``"<first>:<last>"`` (EPOCHS) as two ints; None when absent or malformed."""
    try:
        first, last = (int(v) for v in str(value).split(":"))
    except (TypeError, ValueError):
        return None
    return (first, last) if 0 <= first <= last else None


def ascii_value(text: str, limit: int = 1000) -> str:
    """A metadata-safe version of ``text`` (printable ASCII, bounded)."""
    out = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text).replace("\n", " "))
    return out if len(out) <= limit else out[: limit - 3] + "..."


class LeaseLost(Exception):
    """The caller does not (or no longer) hold this trial."""


class Refused(ValueError):
    """A report or space the chief refuses; nothing changed. ``reason`` labels the refusal
    counter; ``denied``: the caller may not do this at all (else its data is wrong)."""

    def __init__(self, reason: str, message: str, *, denied: bool = False):
        super().__init__(message)
        self.reason, self.denied = reason, denied


class SearchStopped(Exception):
    """The search has ended (``state`` finished or failed); ``reason`` says why."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state = state
        self.reason = reason
