"""A hostile client against a real chief: only our workers steer the search.

The chief is a real process (``tests/tuning_entry.py``, as in test_tuning.py) with
its state in the storage emulator; the attacker talks to it over loopback gRPC
with keras-tuner's own stub (``keras_tuner.src.protos``), the way any pod in the
namespace could. Every hostile call must be refused with the right status code
and counted in ``skin_oracle_refused_calls_total{reason}``; then real workers
finish the search and the published best configuration is one the chief issued,
with the metrics a worker measured.
"""

from __future__ import annotations

import math
import os
import re
import time
import urllib.request

import grpc
import pytest

from conftest import free_port
from skin.tuning import load_best, load_result
from test_tuning import Search

TOKEN = "test-oracle-token-0123456789abcdef"
CALL_TIMEOUT_S = 30


def _service():
    from keras_tuner.src import protos

    return protos.get_service(), protos.get_service_grpc()


def _md(token: str | None = TOKEN, worker: str | None = "tuner0", attempt: int | None = None,
        **extra: str) -> tuple:
    md = []
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    if worker is not None:
        md.append(("skin-worker", worker))
    if attempt is not None:
        md.append(("skin-attempt", str(attempt)))
    md.extend(extra.items())
    return tuple(md)


def _call(stub, method: str, request, md) -> tuple[str, object, dict]:
    """(status code name, response or None, trailing metadata) of one unary call."""
    try:
        response, call = getattr(stub, method).with_call(request, metadata=md,
                                                         timeout=CALL_TIMEOUT_S)
        return "OK", response, dict(call.trailing_metadata() or ())
    except grpc.RpcError as e:
        return e.code().name, None, dict(e.trailing_metadata() or ())


def _ended(trial_proto, status: str, metrics: dict | None = None, values: dict | None = None):
    """An EndTrial request for ``trial_proto`` with the caller's status, metrics and values."""
    from keras_tuner.src.engine import metrics_tracking
    from keras_tuner.src.engine import trial as trial_module

    service, _ = _service()
    trial = trial_module.Trial.from_proto(trial_proto)
    trial.status = status
    if metrics is not None:
        trial.metrics = metrics_tracking.MetricsTracker()
        for name, value in metrics.items():
            trial.metrics.register(name, direction="min" if name.endswith("loss") else "max")
            trial.metrics.update(name, value, step=0)
    if values:
        for name, value in values.items():
            if name not in trial.hyperparameters:
                trial.hyperparameters.Fixed(name, value)
            trial.hyperparameters.values[name] = value
    return service.EndTrialRequest(trial=trial.to_proto())


def _scrape(port: int) -> dict[str, float]:
    """``skin_oracle_refused_calls_total`` by reason from the chief's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for m in re.finditer(r'^skin_oracle_refused_calls_total\{reason="([a-z_]+)"\} (\S+)$', text,
                         re.M):
        found[m.group(1)] = float(m.group(2))
    return found


def _wait_for_chief(stub, service, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _, _ = _call(stub, "GetSpace", service.GetSpaceRequest(), _md())
        if code == "OK":
            return
        time.sleep(0.5)
    pytest.fail("the chief did not answer GetSpace")


@pytest.mark.slow
def test_hostile_calls_are_refused_and_counted_while_workers_publish_their_own_best(
        tmp_path, bucket, emulator, storage):
    s = Search(tmp_path, bucket, emulator, max_trials=3, max_epochs=2, lease_seconds=120,
               max_consecutive_failed_trials=3)
    metrics_port = free_port()
    service, grpc_service = _service()
    try:
        s.start("chief", SKIN_ORACLE_TOKEN=TOKEN, SKIN_METRICS_PORT=str(metrics_port))
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        stub = grpc_service.OracleStub(channel)
        _wait_for_chief(stub, service)

        outcomes: dict[str, tuple[str, str]] = {}  # attack -> (expected, got)

        def attack(name: str, expected: str, method: str, request, md):
            code, response, trailing = _call(stub, method, request, md)
            outcomes[name] = (expected, code)
            return code, response, trailing

        create = service.CreateTrialRequest
        # -- no token, wrong token: refused before anything is looked at
        attack("GetSpace without a token", "UNAUTHENTICATED", "GetSpace",
               service.GetSpaceRequest(), _md(token=None))
        attack("CreateTrial with a wrong token", "UNAUTHENTICATED", "CreateTrial",
               create(tuner_id="tuner0"), _md(token="not-the-token"))

        # A legitimate lease for tuner0 (what its real process will get back later).
        from keras_tuner.src.engine import hyperparameters as hp_module
        from keras_tuner.src.engine import trial as trial_module

        code, response, trailing = _call(stub, "CreateTrial", create(tuner_id="tuner0"), _md())
        assert code == "OK", code
        assert trial_module.Trial.from_proto(response.trial).status == "RUNNING", response
        held = response.trial
        held_id, attempt = held.trial_id, int(trailing["skin-attempt"])
        issued = dict(hp_module.HyperParameters.from_proto(held.hyperparameters).values)

        # -- identity
        attack("CreateTrial for another tuner_id (forged)", "PERMISSION_DENIED", "CreateTrial",
               create(tuner_id="tuner1"), _md(worker="tuner0"))
        attack("CreateTrial as a worker the experiment does not have", "PERMISSION_DENIED",
               "CreateTrial", create(tuner_id="tuner7"), _md(worker="tuner7"))
        attack("CreateTrial as that worker again (logged once)", "PERMISSION_DENIED",
               "CreateTrial", create(tuner_id="tuner7"), _md(worker="tuner7"))
        attack("heartbeat without worker metadata", "PERMISSION_DENIED", "UpdateTrial",
               service.UpdateTrialRequest(trial_id=held_id, metrics={}, step=0),
               _md(worker=None, **{"skin-report": "heartbeat"}))
        attack("EndTrial FAILED without worker metadata", "PERMISSION_DENIED", "EndTrial",
               _ended(held, "FAILED"), _md(worker=None))
        attack("EndTrial FAILED without an attempt", "PERMISSION_DENIED", "EndTrial",
               _ended(held, "FAILED"), _md(worker="tuner0"))
        # -- another worker's trial (the lease check that already existed)
        attack("heartbeat for another worker's trial", "FAILED_PRECONDITION", "UpdateTrial",
               service.UpdateTrialRequest(trial_id=held_id, metrics={}, step=0),
               _md(worker="tuner1", attempt=attempt, **{"skin-report": "heartbeat"}))
        attack("EndTrial FAILED of another worker's trial", "FAILED_PRECONDITION", "EndTrial",
               _ended(held, "FAILED"), _md(worker="tuner1", attempt=attempt))
        # -- reports are data, checked (the holder itself, compromised or broken)
        for value in (math.inf, math.nan, 2.0, -1.0):
            attack(f"EndTrial COMPLETED with val_auc={value}", "INVALID_ARGUMENT", "EndTrial",
                   _ended(held, "COMPLETED", {"val_auc": value}), _md(attempt=attempt))
        attack("epoch report with val_loss=-3", "INVALID_ARGUMENT", "UpdateTrial",
               service.UpdateTrialRequest(trial_id=held_id, metrics={"val_loss": -3.0}, step=0),
               _md(attempt=attempt, **{"skin-report": "epoch"}))
        attack("EndTrial COMPLETED without the objective", "INVALID_ARGUMENT", "EndTrial",
               _ended(held, "COMPLETED", {"val_accuracy": 0.9}), _md(attempt=attempt))
        attack("EndTrial COMPLETED with hyperparameters outside the space", "INVALID_ARGUMENT",
               "EndTrial", _ended(held, "COMPLETED", {"val_auc": 0.999},
                                  {"units": 9999, "backdoor": 1}), _md(attempt=attempt))
        # -- the search space belongs to the chief
        space = hp_module.HyperParameters.from_proto(
            _call(stub, "GetSpace", service.GetSpaceRequest(), _md())[1].hyperparameters)
        attack("(not an attack) UpdateSpace confirming the chief's own space", "OK",
               "UpdateSpace", service.UpdateSpaceRequest(hyperparameters=space.to_proto()), _md())
        space.Int("backdoor", 0, 10)
        attack("UpdateSpace with a new hyperparameter", "PERMISSION_DENIED", "UpdateSpace",
               service.UpdateSpaceRequest(hyperparameters=space.to_proto()), _md())
        after = hp_module.HyperParameters.from_proto(
            _call(stub, "GetSpace", service.GetSpaceRequest(), _md())[1].hyperparameters)
        outcomes["the space after UpdateSpace"] = ("unchanged", "merged" if "backdoor" in [
            hp.name for hp in after.space] else "unchanged")
        # -- an outsider ends the search with three failures (stock keras-tuner: it can)
        for i in range(3):
            code, response, trailing = attack(f"outsider CreateTrial {i + 1}", "UNAUTHENTICATED",
                                              "CreateTrial", create(tuner_id=f"evil{i}"),
                                              _md(token=None, worker=None))
            trial = response.trial if response is not None else held
            attack(f"outsider EndTrial FAILED {i + 1}", "UNAUTHENTICATED", "EndTrial",
                   _ended(trial, "FAILED"), _md(token=None, worker=None))

        refused = _scrape(metrics_port)
        channel.close()
        table = "\n".join(f"  {'ok ' if e == g else 'BAD'} {n}: expected {e}, got {g}"
                          for n, (e, g) in outcomes.items())
        print(f"\nhostile calls against the chief:\n{table}\nrefusals counted: {refused}")
        assert all(e == g for e, g in outcomes.values()), table
        assert {k: v for k, v in refused.items() if v} == {
            "unauthenticated": 8, "identity": 6, "not_holder": 2, "report": 6,
            "hyperparameters": 1, "space": 1}, refused
        log = s.log("chief")
        assert len(re.findall(r"refused .*'tuner7'", log)) == 1, log[-3000:]
        assert TOKEN not in log

        # -- the real workers finish the search
        for role in ("tuner0", "tuner1"):
            s.start(role, SKIN_ORACLE_TOKEN=TOKEN)
        assert s.wait("chief") == 0, s.log("chief")[-4000:]
        assert s.wait("tuner0") == 0, s.log("tuner0")[-4000:]
        assert s.wait("tuner1") == 0, s.log("tuner1")[-4000:]

        result = load_result(storage, s.exp).to_json()
        assert result["outcome"] == "completed", result["reason"]
        assert result["counts"] == {"completed": 3}, result["counts"]
        by_id = {t["id"]: t for t in result["trials"]}
        assert by_id[held_id]["hyperparameters"] == \
            {k: v for k, v in issued.items() if not k.startswith("tuner/")}
        assert {a["worker"] for t in result["trials"] for a in t["attempts"]} <= \
            {"tuner0", "tuner1"}

        best = load_best(storage, s.exp).to_json()
        assert best["hyperparameters"] == by_id[best["trial_id"]]["hyperparameters"]
        assert set(best["hyperparameters"]) == {"units", "learning_rate"}
        assert best["hyperparameters"]["units"] in range(4, 65, 4)
        assert 1e-3 <= best["hyperparameters"]["learning_rate"] <= 1e-1
        # Its score is the one a worker measured and logged, not a caller's 0.999 or 2.0.
        logged = re.findall(rf"trial {best['trial_id']} completed on tuner\d: "
                            r"val_auc=([0-9.]+)", s.log("tuner0") + s.log("tuner1"))
        assert logged and f"{best['score']:.4f}" == logged[0], (best, logged)
    finally:
        s.stop_all()


# -- TLS, with certificates this test makes -------------------------------------------------


def _certificates(folder, *, ca_name: str = "skin test CA"):
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, laid out like the
    Secret (tls.crt, tls.key, ca.crt)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, public_key, signing_key, *, ca: bool, names=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                            critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = cert(ca_subject, ca_subject, ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skin-chief")]), ca_subject,
                  key.public_key(), ca_key, ca=False,
                  names=(x509.DNSName("localhost"), x509.DNSName("skin-chief"),
                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "tls.crt").write_bytes(server.public_bytes(pem))
    (folder / "tls.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    return folder


def _tiny_exp(tmp_path, bucket):
    import yaml

    from skin.infra.config import load_experiment

    doc = {"apiVersion": "skin/v1", "kind": "Experiment", "name": "trust", "workers": 2,
           "storage": {"bucket": bucket, "prefix": "unit"},
           "search": {"tuner": "random", "objective": "val_auc", "max_trials": 4,
                      "max_epochs": 2, "lease_seconds": 30}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_experiment(path, env={})


def test_tls_with_a_test_made_certificate_and_a_worker_with_the_wrong_ca_is_refused(
        tmp_path, bucket):
    from prometheus_client import CollectorRegistry

    from skin.errors import ConfigError, RetryableError
    from skin.metrics import server as metrics
    from skin.tuning.client import ChiefClient
    from skin.tuning.oracle import make_oracle
    from skin.tuning.servicer import make_servicer, serve

    exp = _tiny_exp(tmp_path, bucket)
    oracle = make_oracle(exp)
    oracle.hyperparameters.Float("x", 0.0, 1.0)
    hooks = metrics.role_metrics(CollectorRegistry(), exp, "chief")
    good = _certificates(tmp_path / "tls")
    wrong = _certificates(tmp_path / "other", ca_name="someone else's CA")
    port = free_port()
    server = serve(make_servicer(oracle, hooks, workers=2), port, "127.0.0.1", threads=4,
                   token=TOKEN, tls_dir=str(good), metrics=hooks)
    address = f"127.0.0.1:{port}"
    local = make_oracle(exp, leased=False)
    clients = []

    def client(**kw):
        c = ChiefClient(address, "tuner0", local, patience_s=2, max_backoff_s=0.5, **kw)
        clients.append(c)
        return c

    try:
        trial = client(token=TOKEN, tls_dir=str(good)).create_trial("tuner0")
        assert trial.status == "RUNNING"
        # The wrong CA: the handshake fails, nothing reaches the oracle.
        with pytest.raises(RetryableError, match="UNAVAILABLE"):
            client(token=TOKEN, tls_dir=str(wrong)).create_trial("tuner1")
        # Plain text to a TLS port: no answer either.
        with pytest.raises(RetryableError):
            client(token=TOKEN).get_space()
        # Over TLS but with a wrong token: refused, and a worker makes that a config error.
        with pytest.raises(ConfigError, match="UNAUTHENTICATED"):
            client(token="a-wrong-token-of-enough-length", tls_dir=str(good)).get_space()
        assert [t.trial_id for t in oracle.trials.values()] == [trial.trial_id]
        assert list(oracle.ongoing_trials) == ["tuner0"]
    finally:
        for c in clients:
            c.close()
        server.stop(0).wait()


# -- configuration: the token, the bind address, the chief's refusal to serve an open oracle --


def test_the_token_comes_from_the_environment_or_a_file_and_is_never_shown(tmp_path):
    from skin.errors import ConfigError
    from skin.infra.runtime import runtime_from_env

    assert runtime_from_env({"SKIN_ORACLE_TOKEN": TOKEN}).oracle_token == TOKEN
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # kubectl create secret --from-file keeps a newline
    runtime = runtime_from_env({"SKIN_ORACLE_TOKEN_FILE": str(secret)})
    assert runtime.oracle_token == TOKEN
    assert TOKEN not in repr(runtime) and TOKEN not in str(runtime)
    with pytest.raises(ConfigError, match=r"SKIN_ORACLE_TOKEN_FILE: .*missing.* cannot be read"):
        runtime_from_env({"SKIN_ORACLE_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="both set"):
        runtime_from_env({"SKIN_ORACLE_TOKEN": TOKEN, "SKIN_ORACLE_TOKEN_FILE": str(secret)})
    with pytest.raises(ConfigError, match="at least 16") as e:
        runtime_from_env({"SKIN_ORACLE_TOKEN": "short secret"})
    assert "short secret" not in str(e.value)


@pytest.mark.parametrize("env, hosts", [
    ({}, ("127.0.0.1",)),                                               # by hand: loopback
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_IP": "10.4.0.7"}, ("10.4.0.7", "127.0.0.1")),
    ({"SKIN_BIND_ADDRESS": "192.168.1.5"}, ("192.168.1.5",)),
])
def test_the_oracle_and_metrics_bind_loopback_unless_told_or_in_a_pod(env, hosts):
    from skin.infra.runtime import runtime_from_env

    runtime = runtime_from_env(env)
    assert runtime.bind_hosts == hosts
    assert runtime.metrics_hosts == hosts


def test_a_chief_without_a_token_in_kubernetes_exits_2_naming_the_secret(tmp_path, bucket,
                                                                          caplog):
    from skin.context import RoleContext
    from skin.errors import EXIT_CONFIG
    from skin.infra.runtime import runtime_from_env
    from skin.tuning import run_chief

    exp = _tiny_exp(tmp_path, bucket)
    runtime = runtime_from_env({"KERASTUNER_TUNER_ID": "chief", "POD_IP": "10.4.0.7",
                                "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert run_chief(RoleContext(exp, runtime, None)) == EXIT_CONFIG  # before touching storage
    assert "skin-oracle-token" in caplog.text and "SKIN_ORACLE_TOKEN" in caplog.text
    # Outside Kubernetes, on an address others can reach: the same.
    runtime = runtime_from_env({"KERASTUNER_TUNER_ID": "chief", "SKIN_BIND_ADDRESS": "0.0.0.0"})
    assert run_chief(RoleContext(exp, runtime, None)) == EXIT_CONFIG


def test_skin_run_hands_each_tuning_role_a_fresh_token_in_the_environment_only(tmp_path):
    from skin import run as skin_run
    from skin.infra.config import parse_experiment
    from skin.run import Child, RunOptions

    class Recorder(skin_run.Supervisor):
        """Records the children it is asked to start; each exits 0 at once."""

        def start(self, child: Child) -> Child:
            child.exit_code = 0
            self.children[child.name] = child
            return child

        def poll(self, child: Child):
            return child.exit_code

    exp = parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "workers": 2}, env={})
    tokens = []
    for run in range(2):
        sup = Recorder(tmp_path / f"logs{run}", echo=False)
        role_env = lambda name, **extra: dict(os.environ, **extra)  # noqa: E731
        assert skin_run._tune(exp, RunOptions(metrics_port=0), sup, role_env) == 0
        assert set(sup.children) == {"chief", "tuner0", "tuner1"}
        seen = {c.env["SKIN_ORACLE_TOKEN"] for c in sup.children.values()}
        assert len(seen) == 1
        token = seen.pop()
        assert len(token) >= 32
        for child in sup.children.values():
            assert not any(token in arg for arg in child.argv)
        tokens.append(token)
    assert tokens[0] != tokens[1]


# -- the retrain trains only what the search could have issued ------------------------------


def _retrain_exp(bucket: str, **search):
    from skin.infra.config import parse_experiment

    return parse_experiment({
        "apiVersion": "skin/v1", "kind": "Experiment", "name": "tampered",
        "storage": {"bucket": bucket, "prefix": "it"},
        "data": {"image_size": 32},
        "search": {"tuner": "random", "max_trials": 2, "max_epochs": 2, **search},
        "retrain": {"epochs": 1}}, env={})


def _spec(**changes):
    from test_retrain import BEST

    values = {**BEST["hyperparameters"], **changes}
    return {**BEST, "hyperparameters": {k: v for k, v in values.items() if v is not None}}


@pytest.mark.parametrize("changes, fixed, message", [
    ({"filters": 17}, {}, r"filters: 17 is not valid; the search space allows"),
    ({"optimizer": "evil"}, {}, r"optimizer: 'evil' is not valid; the search space allows one of"),
    ({"backdoor": 1}, {}, r"backdoor: 1 is not valid; the search space has no hyperparameter"),
    ({"blocks": None}, {}, r"blocks: missing"),
    ({"batch_size": 32}, {"batch_size": 16}, r"batch_size: 32 is not valid; search.fixed pins it "
                                             r"to 16"),
])
def test_retrain_refuses_values_outside_the_space_or_fixed(changes, fixed, message):
    from skin.errors import ConfigError
    from skin.model.hypermodel import SkinHyperModel
    from skin.publishing import training

    exp = _retrain_exp("b-b", fixed=fixed)
    training.check_members(exp, SkinHyperModel(exp), [_spec(batch_size=16) if fixed else _spec()])
    with pytest.raises(ConfigError, match=message) as e:
        training.check_members(exp, SkinHyperModel(exp), [_spec(**changes)])
    assert "nothing was trained or published" in str(e.value)


@pytest.mark.slow
def test_skin_retrain_on_a_tampered_best_exits_2_and_publishes_nothing(tmp_path, bucket,
                                                                      emulator, storage):
    import subprocess
    import sys

    import yaml

    from skin.infra.artifacts import best_uri
    from skin.infra.storage import join

    exp = _retrain_exp(bucket)
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(exp.to_dict()))
    storage.write_json(best_uri(exp), _spec(learning_rate=7.5))  # a 7.5 learning rate
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIN_", "KERASTUNER_"))}
    env.update(emulator.environ(), SKIN_CONFIG=str(config), SKIN_WORK_DIR=str(tmp_path / "w"),
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-m", "skin.cli", "retrain"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "learning_rate: 7.5 is not valid" in done.stdout + done.stderr
    assert storage.list(exp.models_uri) == []
    assert not storage.exists(join(exp.models_uri, "LATEST"))


# -- the oracle's checks, in process --------------------------------------------------------


def test_a_refused_ending_changes_nothing_and_a_reported_objective_may_end_a_trial(tmp_path,
                                                                                   bucket):
    from keras_tuner.src.engine import metrics_tracking
    from keras_tuner.src.engine import trial as trial_module

    from skin.tuning.oracle import make_oracle
    from skin.tuning.protocol import Refused

    exp = _tiny_exp(tmp_path, bucket)
    oracle = make_oracle(exp)
    oracle.hyperparameters.Float("x", 0.0, 1.0)
    held = oracle.assign("tuner0")
    tid = held.trial.trial_id
    before = (oracle.trials[tid].get_state(), [dict(a) for a in oracle.meta[tid]["attempts"]])

    def ending(values=None, **metrics):
        trial = trial_module.Trial.from_state(oracle.trials[tid].get_state())
        trial.status = "COMPLETED"
        trial.metrics = metrics_tracking.MetricsTracker()
        for name, value in metrics.items():
            trial.metrics.register(name, direction="max")
            trial.metrics.update(name, value, step=0)
        trial.hyperparameters.values.update(values or {})
        return trial

    for bad, reason in ((ending(val_auc=1.5), "report"), (ending(val_auc=float("nan")), "report"),
                        (ending(val_accuracy=0.9), "report"),
                        (ending({"x": 2.0}, val_auc=0.9), "hyperparameters")):
        with pytest.raises(Refused) as e:
            oracle.end(bad, "tuner0", held.attempt)
        assert e.value.reason == reason
    assert (oracle.trials[tid].get_state(), oracle.meta[tid]["attempts"]) == before
    with pytest.raises(Refused, match="val_auc"):
        oracle.report(tid, "tuner0", held.attempt, {"val_auc": float("inf")}, 0,
                      progress_only=False)
    # The stock flow: the final metrics in an UpdateTrial, then an ending without them.
    oracle.report(tid, "tuner0", held.attempt, {"val_auc": 0.75}, 1, progress_only=False)
    oracle.end(ending(), "tuner0", held.attempt)
    assert oracle.trials[tid].status == "COMPLETED" and oracle.trials[tid].score == 0.75
    assert oracle.trials[tid].hyperparameters.values == held.trial.hyperparameters.values


def test_a_worker_fails_a_diverged_trial_instead_of_reporting_nan():
    from types import SimpleNamespace

    import keras_tuner
    from keras_tuner.src import errors as kt_errors

    from skin.tuning.checkpoints import EpochReporter

    reported = []
    tuner = SimpleNamespace(
        oracle=SimpleNamespace(objective=keras_tuner.Objective("val_auc", "max"),
                               report_epoch=lambda *a: reported.append(a)),
        heartbeat=None, tuner_id="tuner0")
    reporter = EpochReporter(tuner, SimpleNamespace(trial_id="0007"), 0,
                             {"history": [], "epochs": 3})
    with pytest.raises(kt_errors.FailedTrialError, match=r"epoch 2: metric loss: nan is not "
                                                         r"finite \(training diverged\)"):
        reporter.on_epoch_end(1, {"loss": float("nan"), "val_auc": 0.5})
    assert reported == []  # nothing the chief would refuse was sent
