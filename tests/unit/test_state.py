"""Where the engine runs and which secrets provider a stack gets (no backend needed)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gco_infra import state
from gco_infra.program import PROJECT_ROOT

KMS = "awskms://alias/gco-infra-state?region=us-east-1"


def _project(tmp_path, stacks):
    (tmp_path / "stacks").mkdir(parents=True)
    (tmp_path / "Pulumi.yaml").write_text("name: gco-infra\nruntime: python\nstackConfigDir: stacks\n")
    for name, doc in stacks.items():
        (tmp_path / "stacks" / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


def test_the_engines_copy_has_the_config_and_no_secrets_settings(tmp_path):
    root = _project(tmp_path / "repo", {
        "a": {"secretsprovider": KMS, "encryptedkey": "abc", "config": {"gco:region": "x"}},
        "b": {"encryptionsalt": "v1:salt"}})
    copy = state.write_project(tmp_path / "engine", root)
    assert yaml.safe_load((copy / "stacks" / "Pulumi.a.yaml").read_text()) == {"config": {"gco:region": "x"}}
    assert (copy / "stacks" / "Pulumi.b.yaml").read_text() == ""
    assert (copy / "Pulumi.yaml").read_text() == (root / "Pulumi.yaml").read_text()


def test_the_engine_runs_in_a_private_copy_and_keeps_the_states_provider():
    assert state.project_dir() == state.project_dir() != str(PROJECT_ROOT)
    assert state.engine_env({"A": "1"}) == {"A": "1", "PULUMI_FALLBACK_TO_STATE_SECRETS_MANAGER": "true",
                                            "PULUMI_RUN_PROGRAM": "true", "TMPDIR": state.engine_tmp(),
                                            "PULUMI_K8S_CLIENT_QPS": "200", "PULUMI_K8S_CLIENT_BURST": "400"}


def test_the_providers_request_rate_is_raised_unless_the_operator_set_one():
    assert state.engine_env({"PULUMI_K8S_CLIENT_QPS": "20"})["PULUMI_K8S_CLIENT_QPS"] == "20"
    assert state.engine_env({})["PULUMI_K8S_CLIENT_BURST"] == "400"


def test_a_new_stack_gets_the_provider_its_file_declares(tmp_path):
    root = _project(tmp_path, {"r": {"secretsprovider": KMS}, "plain": {"config": {}}})
    assert state.declared_secrets_provider("r", {}, root) == KMS
    assert state.declared_secrets_provider("r.shard-3", {}, root) == KMS  # a shard: its region's file
    assert state.declared_secrets_provider("plain", {}, root) is None
    assert state.declared_secrets_provider("plain", {"GCO_SECRETS_PROVIDER": "awskms://alias/x"}, root) == "awskms://alias/x"


def test_every_production_stack_declares_the_platform_key():
    """The platform stack's key (one, in the home region with the state bucket) under its alias."""
    from gco_infra.platform_stack import KEY_ALIAS

    example = yaml.safe_load((PROJECT_ROOT / "platform" / "Pulumi.example.yaml").read_text())["config"]
    home = example["aws:region"]
    for region in ("us-east-1", "us-west-2", "eu-west-1"):
        doc = yaml.safe_load((PROJECT_ROOT / "stacks" / f"Pulumi.{region}.yaml").read_text())
        assert doc["secretsprovider"] == f"awskms://{KEY_ALIAS}?region={home}"
        assert not {"encryptedkey", "encryptionsalt"} & set(doc)


def test_a_state_encrypted_otherwise_is_reported_not_migrated():
    env = {"GCO_SECRETS_PROVIDER": KMS}
    cloud = {"secrets_providers": {"type": "cloud", "state": {"url": KMS, "encryptedkey": "k"}}}
    assert state.secrets_mismatch("nofile", cloud, env) is None
    message = state.secrets_mismatch("nofile", {"secrets_providers": {"type": "passphrase", "state": {}}}, env)
    assert message and "passphrase" in message and "change-secrets-provider" in message
    assert state.secrets_mismatch("nofile", {}, env) is None


def test_sibling_pods_are_pods_of_the_same_deployment():
    me = "gco-runner-6b7c8d9f5-abcde"
    assert state.sibling_pod(me, "gco-runner-6b7c8d9f5-x1y2z")
    assert state.sibling_pod(me, "gco-runner-7f6e5d4c3-x1y2z")  # an earlier ReplicaSet
    assert not state.sibling_pod(me, me)
    assert not state.sibling_pod(me, "gco-health-6b7c8d9f5-x1y2z")
    assert not state.sibling_pod(me, "alices-laptop")
    assert not state.sibling_pod("runner", "gco-runner-6b7c8d9f5-x1y2z")  # not in a Deployment's pod
    assert state.pod_gone_from_env({}) is None
    gone = state.pod_gone_from_env({state.POD_NAME: me, state.POD_NAMESPACE: "gco-system"})
    assert gone is not None and gone("alices-laptop") is False  # never asks about anyone else


def test_a_lock_that_vanished_while_the_engine_read_it_is_contention():
    from gco_infra.runner import _LOCK_RACE

    # pulumi v3.274.1, two runners creating one stack on S3 at once (seen in the race e2e test)
    seen = ('error: could not create stack: blob (key ".pulumi/locks/organization/gco-infra/local/'
            '0e4ff14f-c2f4-4e67-a9a5-325a39b277b6.json") (code=NotFound): operation error S3: GetObject, '
            'https response error StatusCode: 404, NoSuchKey: The specified key does not exist.')
    assert _LOCK_RACE.search(seen)
    assert not _LOCK_RACE.search('error: blob (key ".pulumi/stacks/gco-infra/local.json") (code=NotFound)')


def test_the_engines_temporary_files_do_not_pile_up():
    """The provider leaves a kubeconfig copy in TMPDIR per start; in a pod that is an emptyDir."""
    tmp = Path(state.engine_tmp())
    assert tmp.parent == Path(state.project_dir()) and tmp.is_dir()
    state.clear_engine_tmp()  # what earlier engine operations of this test process left
    (tmp / "kubeconfig123").write_text("{}")
    (tmp / "plugin-dir").mkdir()
    (tmp / "plugin-dir" / "f").write_text("x")
    assert state.clear_engine_tmp() == 2
    assert list(tmp.iterdir()) == [] and (Path(state.project_dir()) / "stacks").is_dir()


def test_each_backend_gets_its_own_project_copy():
    """A stack's data key, encrypted for one backend's KMS key, never reaches the same stack of another
    backend (one process, two local environments)."""
    a, b = state.project_dir("s3://one"), state.project_dir("s3://two")
    assert a != b and state.project_dir("s3://one") == a
    assert state.engine_env({"PULUMI_BACKEND_URL": "s3://two"})["TMPDIR"] == str(Path(b) / "tmp")


def _checkpoint(root: Path, stack: str, latest, suffix: str = ".json") -> None:
    base = root / ".pulumi" / "stacks" / state.PROJECT
    base.mkdir(parents=True, exist_ok=True)
    (base / f"{stack}{suffix}").write_text(json.dumps({"version": 3, "checkpoint": {"stack": stack, "latest": latest}}))


def test_pending_operations_are_read_from_the_checkpoint_without_the_engine(tmp_path):
    env = {"PULUMI_BACKEND_URL": f"file://{tmp_path}"}
    assert state.pending_operations("never", env) is None  # not found here: the export decides
    _checkpoint(tmp_path, "clean", {"resources": [{"urn": "u"}]})
    assert state.pending_operations("clean", env) == 0
    _checkpoint(tmp_path, "killed", {"resources": [], "pending_operations": [{"type": "creating"}, {"type": "updating"}]})
    assert state.pending_operations("killed", env) == 2
    _checkpoint(tmp_path, "empty", {"resources": [], "pending_operations": []})
    assert state.pending_operations("empty", env) == 0
    _checkpoint(tmp_path, "mention", {"resources": [{"urn": "u", "outputs": {"pending_operations": [1]}}]})
    assert state.pending_operations("mention", env) == 0  # the text alone is not the key: parsed then
    (tmp_path / ".pulumi" / "stacks" / state.PROJECT / "odd.json").write_text("{not json")
    assert state.pending_operations("odd", env) is None  # unreadable: the engine's export decides
    _checkpoint(tmp_path, "zipped", {"resources": []}, suffix=".json.gz")
    assert state.pending_operations("zipped", env) is None
    assert state.pending_operations("clean", {"PULUMI_BACKEND_URL": "https://api.pulumi.com"}) is None


def test_the_outputs_are_read_from_the_checkpoint_exported_with_its_secrets_shown():
    secret = lambda v: {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270",  # noqa: E731
                        "plaintext": json.dumps(v)}
    root = {"urn": "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::gco-infra-s", "type": "pulumi:pulumi:Stack",
            "outputs": {"region": "r1", "endpoints": {"a": {"fingerprint": "f", "record": secret('{"x": 1}')}},
                        "invalid": {}, "list": [secret({"k": [1, 2]})]}}
    child = {"urn": "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::nested", "type": "pulumi:pulumi:Stack",
             "parent": root["urn"], "outputs": {"region": "other"}}
    assert state.stack_outputs_of({"resources": [root, child]}) == {
        "region": "r1", "endpoints": {"a": {"fingerprint": "f", "record": '{"x": 1}'}}, "invalid": {},
        "list": [{"k": [1, 2]}]}
    encrypted = {**root, "outputs": {"endpoints": {"a": {"record": {
        "4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270", "ciphertext": "v1:abc"}}}}}
    assert state.stack_outputs_of({"resources": [encrypted]}) is None  # the CLI answers then
    assert state.stack_outputs_of({"resources": []}) is None
