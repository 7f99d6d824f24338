"""The platform stack's Kubernetes half on a local region, with the real engine and provider: it
coexists with what `local up` applied, and the identities it creates have exactly the rights the
runner and the health job need (SelfSubjectAccessReviews, then a real runner tick and a real
`gco-infra health --once`, each with its own ServiceAccount's token)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kubernetes import client

from gco_infra import localenv, system
from gco_infra.platform_stack import RegionSettings, declare_cluster
from gco_infra.preview import preview_stack
from gco_infra.program import settings_from_stack_file
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides

from .conftest import make_runner
from .test_endpoints_e2e import put, status

REGION = "local-1"
PROBE = "platform-probe"
WORKLOADS = system.Workloads(image="localhost/gco-infra:e2e", stack="local", aws_region="us-east-1",
                             backend_url="s3://gco-infra-state?region=us-east-1",
                             secrets_provider="awskms://alias/gco-infra-state?region=us-east-1")


def engine_env(env, tmp_path) -> dict[str, str]:
    """A file backend of its own: the platform's state never mixes with the endpoints stacks'."""
    (tmp_path / "backend").mkdir()
    (tmp_path / "home").mkdir()
    base = env.pulumi_env()
    return {"PATH": base["PATH"], "PULUMI_BACKEND_URL": f"file://{tmp_path / 'backend'}", "PULUMI_CONFIG_PASSPHRASE": "",
            "PULUMI_SKIP_UPDATE_CHECK": "true", "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_HOME": str(tmp_path / "home")}


def platform_stack(env, tmp_path, monkeypatch):
    import pulumi_kubernetes as k8s
    from pulumi import automation as auto

    region = RegionSettings(region=REGION, stack="local", namespaces=localenv.NAMESPACES)

    def program() -> None:  # the platform's Kubernetes half, with a provider for the local cluster
        provider = k8s.Provider(REGION, kubeconfig=str(env.kubeconfig(REGION)))
        declare_cluster(provider, region, WORKLOADS)

    engine = engine_env(env, tmp_path)
    monkeypatch.setenv("PATH", engine["PATH"])  # where the Automation API finds the CLI
    return auto.create_or_select_stack(
        stack_name="platform-e2e", project_name="gco-platform", program=program,
        opts=auto.LocalWorkspaceOptions(env_vars=engine, project_settings=auto.ProjectSettings(
            name="gco-platform", runtime="python")))


def token_kubeconfig(env, service_account: str, path) -> str:
    """The region's kubeconfig (same cluster entry, so the stacks' provider is not replaced), with a
    freshly minted token of a gco-system ServiceAccount instead of the admin's."""
    token = client.CoreV1Api(env.kube(REGION)).create_namespaced_service_account_token(
        service_account, system.SYSTEM_NAMESPACE,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)))
    cfg = json.loads(env.kubeconfig(REGION).read_text())
    for user in cfg["users"]:
        user["user"] = {"token": token.status.token}
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return str(path)


def impersonating_kubeconfig(env, user: str, group: str, path) -> str:
    """The admin's kubeconfig acting as a user of ``group``: what the preview's IAM role becomes
    through its EKS access entry."""
    cfg = json.loads(env.kubeconfig(REGION).read_text())
    for entry in cfg["users"]:
        entry["user"] = {**entry["user"], "as": user, "as-groups": [group]}
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return str(path)


def can(api, verb, resource, namespace, group="", name=None) -> bool:
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(verb=verb, resource=resource, group=group, namespace=namespace,
                                                        name=name)))
    return client.AuthorizationV1Api(api).create_self_subject_access_review(review).status.allowed


def impersonating(env, user: str, group: str):
    """The admin's client acting as a user of ``group`` (what an EKS access entry maps an IAM role to)."""
    api = env.kube(REGION)
    api.default_headers["Impersonate-User"] = user
    api.default_headers["Impersonate-Group"] = group
    return api


def gone(delete, *args, **kwargs) -> None:
    """Delete, when it is there."""
    try:
        delete(*args, **kwargs)
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def managers(obj) -> set[str]:
    return {f.manager for f in obj.metadata.managed_fields or []}


def test_platform_kubernetes_half_applies_over_local_up_and_grants_exactly_what_each_job_needs(env, tmp_path, monkeypatch):
    from kubernetes import config

    admin = env.kube(REGION)
    rbac, apps = client.RbacAuthorizationV1Api(admin), client.AppsV1Api(admin)
    stack = platform_stack(env, tmp_path, monkeypatch)
    try:
        # -- the real engine applies the objects `local up` already applied (field manager gco-local)
        up = stack.up(color="never", suppress_progress=True)
        assert up.summary.result == "succeeded"
        assert (up.summary.resource_changes or {}).get("create") == len(
            system.system_objects(localenv.NAMESPACES, WORKLOADS)) + 3  # + the stack, the component, the provider
        role = rbac.read_namespaced_role(system.RUNNER, "gco-inference")
        assert "gco-local" in managers(role) and any(m.startswith("pulumi-kubernetes") for m in managers(role)), \
            managers(role)
        assert [r.to_dict()["verbs"] for r in role.rules] == [list(system.WRITE)] * 4
        runner_dep = apps.read_namespaced_deployment(system.RUNNER, system.SYSTEM_NAMESPACE)
        assert runner_dep.spec.strategy.type == "Recreate" and runner_dep.spec.replicas == 1
        assert runner_dep.spec.template.spec.containers[0].security_context.read_only_root_filesystem is True
        assert apps.read_namespaced_deployment(system.HEALTH, system.SYSTEM_NAMESPACE).spec.replicas == 2
        pdb = client.PolicyV1Api(admin).read_namespaced_pod_disruption_budget(system.HEALTH, system.SYSTEM_NAMESPACE)
        assert pdb.spec.min_available == 1
        policies = client.NetworkingV1Api(admin).list_namespaced_network_policy(system.SYSTEM_NAMESPACE).items
        assert {p.metadata.name for p in policies} == {"default-deny", "allow-dns", "allow-https", "allow-pod-identity-agent"}

        # -- `local up` again (its server-side apply, forced) and the stack agree: nothing to change
        for obj in system.identities(localenv.NAMESPACES):
            localenv.apply_object(admin, obj)
        stack.refresh(color="never", suppress_progress=True)
        stack.preview(color="never", suppress_progress=True, expect_no_changes=True)

        # -- what each ServiceAccount may and may not do
        runner_cfg = token_kubeconfig(env, system.RUNNER, tmp_path / "runner.kubeconfig")
        health_cfg = token_kubeconfig(env, system.HEALTH, tmp_path / "health.kubeconfig")
        runner_api, health_api = config.new_client_from_config(runner_cfg), config.new_client_from_config(health_cfg)
        for ns in localenv.NAMESPACES:
            assert can(runner_api, "create", "deployments", ns, "apps")
            assert can(runner_api, "delete", "horizontalpodautoscalers", ns, "autoscaling")
            assert can(runner_api, "patch", "ingresses", ns, "networking.k8s.io")
            assert can(runner_api, "update", "services", ns)
        assert not can(runner_api, "create", "deployments", "kube-system", "apps")
        assert not can(runner_api, "create", "deployments", system.SYSTEM_NAMESPACE, "apps")  # not its own Deployment
        assert not can(runner_api, "get", "secrets", "gco-inference")
        assert not can(runner_api, "create", "pods", "gco-inference")
        assert not can(runner_api, "list", "deployments", None, "apps")  # nothing cluster-wide
        assert can(runner_api, "get", "pods", system.SYSTEM_NAMESPACE)  # is a lock's runner pod gone?
        assert not can(runner_api, "list", "pods", system.SYSTEM_NAMESPACE)

        assert can(health_api, "delete", "ingresses", "gco-inference", "networking.k8s.io")
        assert can(health_api, "list", "deployments", "gco-inference-team-b", "apps")
        assert not can(health_api, "delete", "deployments", "gco-inference", "apps")
        assert not can(health_api, "patch", "deployments", "gco-inference", "apps")
        assert not can(health_api, "create", "ingresses", "gco-inference", "networking.k8s.io")
        assert can(health_api, "update", "leases", system.SYSTEM_NAMESPACE, "coordination.k8s.io", name="gco-health")
        assert can(health_api, "create", "leases", system.SYSTEM_NAMESPACE, "coordination.k8s.io")
        assert not can(health_api, "update", "leases", system.SYSTEM_NAMESPACE, "coordination.k8s.io", name="other")
        assert not can(health_api, "get", "secrets", "gco-inference")

        preview_api = impersonating(env, "preview-e2e", system.PREVIEW_GROUP)
        for verb in ("get", "list", "watch"):
            assert can(preview_api, verb, "deployments", "gco-inference", "apps")
            assert can(preview_api, verb, "horizontalpodautoscalers", "gco-inference-team-b", "autoscaling")
        for verb in ("create", "patch", "update", "delete"):
            assert not can(preview_api, verb, "deployments", "gco-inference", "apps")
            assert not can(preview_api, verb, "ingresses", "gco-inference", "networking.k8s.io")
        assert not can(preview_api, "get", "secrets", "gco-inference")
        assert not can(preview_api, "get", "pods", system.SYSTEM_NAMESPACE)

        def local_stack(kubeconfig):
            return with_local_overrides(settings_from_stack_file("local"), kubeconfig, env.dynamodb_endpoint, env.table)

        # -- the engine really acts as the token's identity: as gco-health, a tick cannot create Deployments
        put(env, PROBE, replicas=1)
        wrong = Runner([local_stack(health_cfg)], env.store(), env.pulumi_env(), RunnerOptions())
        try:
            (result,) = wrong.tick(force_full=True)
        finally:
            wrong.close()
        assert result.action == "failed" and "forbidden" in json.dumps(result.endpoint_errors).lower(), result.summary()

        # -- a real runner tick as gco-runner: creates an endpoint's objects, with a refresh
        runner = Runner([local_stack(runner_cfg)], env.store(), env.pulumi_env(), RunnerOptions())
        try:
            results = runner.tick(force_full=True)
            assert [(r.action, r.failed) for r in results] == [("full", 0)], [r.summary() + str(r.endpoint_errors)
                                                                             for r in results]
            assert apps.read_namespaced_deployment(PROBE, "gco-inference").spec.replicas == 1
            after = status(env, PROBE)
            assert after["state"] in ("creating", "updating") and not after.get("error"), after  # the failure is over

            # -- a real health tick as gco-health (leader election included): reads, writes the status
            proc = subprocess.run(
                [sys.executable, "-m", "gco_infra.cli", "--json-logs", "health", "--stack", "local", "--once",
                 "--kubeconfig", health_cfg],
                env={**os.environ, "GCO_STATE_DIR": str(env.path), "GCO_DYNAMODB_ENDPOINT": env.dynamodb_endpoint,
                     "GCO_TABLE": env.table, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                     "AWS_REGION": "us-east-1"},
                capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert status(env, PROBE)["replicas_desired"] == 1 and status(env, PROBE)["replicas_ready"] == 0
            lease = client.CoordinationV1Api(admin).read_namespaced_lease("gco-health", system.SYSTEM_NAMESPACE)
            assert lease.spec.holder_identity

            # -- a preview with --refresh as the preview group: reads everything it needs; its server-side
            # dry runs are refused, and the provider diffs on the client side instead
            put(env, PROBE, replicas=2)
            preview_cfg = impersonating_kubeconfig(env, "preview-e2e", system.PREVIEW_GROUP, tmp_path / "preview.kubeconfig")
            seen = preview_stack(local_stack(preview_cfg), env.store().list_endpoints(), env.pulumi_env(), refresh=True)
            assert seen.error is None, seen.error
            assert [(c.op, c.resource) for c in seen.changes if c.endpoint == PROBE] == [("update", f"Deployment/{PROBE}")], \
                seen.changes
            assert apps.read_namespaced_deployment(PROBE, "gco-inference").spec.replicas == 1  # it changed nothing

            # -- and the runner removes what it created (delete rights)
            put(env, PROBE, state="deleted")
            results = runner.tick()
            assert [(r.action, r.failed) for r in results] == [("targeted", 0)], [r.summary() for r in results]
            with pytest.raises(client.ApiException) as missing:
                apps.read_namespaced_deployment(PROBE, "gco-inference")
            assert missing.value.status == 404
        finally:
            runner.close()
            gone(client.CoordinationV1Api(admin).delete_namespaced_lease, "gco-health", system.SYSTEM_NAMESPACE)
            # The `local` stack's state names this test's kubeconfigs: back to the admin's for the tests
            # that follow (`up --refresh` refreshes with the state's provider unless the program runs first).
            monkeypatch.setenv("PULUMI_RUN_PROGRAM", "true")
            host = make_runner(env, stacks=("local",))
            try:
                restored = host.tick(force_full=True)
            finally:
                host.close()
            print("restored:", [r.summary() for r in restored])
    finally:
        # Leave local-1 as `local up` made it: the workloads and policies go, the identities stay.
        net = client.NetworkingV1Api(admin)
        for name in (system.RUNNER, system.HEALTH):
            gone(apps.delete_namespaced_deployment, name, system.SYSTEM_NAMESPACE, propagation_policy="Background")
        gone(client.PolicyV1Api(admin).delete_namespaced_pod_disruption_budget, system.HEALTH, system.SYSTEM_NAMESPACE)
        for p in net.list_namespaced_network_policy(system.SYSTEM_NAMESPACE).items:
            gone(net.delete_namespaced_network_policy, p.metadata.name, system.SYSTEM_NAMESPACE)


# ---- the state policies, with the real CLI against an S3 that enforces IAM -------------------------------------


def test_state_policies_let_the_engine_run_and_nothing_more(tmp_path, monkeypatch):
    """The runner's and the preview's S3 statements (iam.py), enforced by moto's S3 (signatures and
    policies checked on every request), under the real Pulumi CLI: the runner creates, updates,
    exports and imports its stacks and manages its locks; the preview lists, reads and previews with
    a refresh, takes no lock, and cannot update; neither may touch another project's state (the
    platform's) or the backend's layout marker. KMS is left out: moto does not evaluate key ARNs
    (the stacks here use a passphrase)."""
    import urllib.request

    import boto3
    import pulumi
    from pulumi import automation as auto

    from gco_infra import iam

    port = localenv.free_port()
    pid = localenv.start_moto(port, tmp_path / "moto.log")
    try:
        aws = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        admin = dict(aws, aws_access_key_id="admin", aws_secret_access_key="admin")
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket="gco-state")
        s3.put_object(Bucket="gco-state", Key=".pulumi/meta.yaml", Body=b"version: 1\n")  # the platform stack's object
        names = iam.AwsNames(partition="aws", account="123456789012", table="t", table_regions=("us-east-1",),
                             stream_arns=("arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/x",),
                             state_bucket="gco-state", state_region="us-east-1", key_arn="arn:aws:kms:us-east-1:1:key/k",
                             clusters=(("us-east-1", "c"),))
        keys = {}
        for who, doc in (("runner", iam.runner_policy(names, ["state-iam"])), ("preview", iam.preview_policy(names))):
            s3_only = [st for st in doc["Statement"] if all(a.startswith("s3:") for a in st["Action"])]
            assert s3_only
            client_iam = boto3.client("iam", **admin)
            client_iam.create_user(UserName=who)
            client_iam.put_user_policy(UserName=who, PolicyName="state",
                                       PolicyDocument=json.dumps({**doc, "Statement": s3_only}))
            k = client_iam.create_access_key(UserName=who)["AccessKey"]
            keys[who] = {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]}
        # from now on every request is authenticated and authorized
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "application/octet-stream"}), timeout=10).read()
        monkeypatch.setenv("PATH", f"{localenv.tools_bin()}{os.pathsep}{os.environ['PATH']}")

        def engine(who, project="gco-infra", name="state-iam"):
            env = {"PULUMI_BACKEND_URL": f"s3://gco-state?endpoint=127.0.0.1:{port}&disableSSL=true&s3ForcePathStyle=true"
                                         "&region=us-east-1",
                   "AWS_ACCESS_KEY_ID": keys[who]["aws_access_key_id"],
                   "AWS_SECRET_ACCESS_KEY": keys[who]["aws_secret_access_key"], "AWS_REGION": "us-east-1",
                   "PULUMI_CONFIG_PASSPHRASE": "", "PULUMI_SKIP_UPDATE_CHECK": "true",
                   "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true", "PULUMI_HOME": str(tmp_path / f"home-{who}")}
            return auto.create_or_select_stack(
                stack_name=name, project_name=project, program=lambda: pulumi.export("v", pulumi.Output.secret("s")),
                opts=auto.LocalWorkspaceOptions(env_vars=env, project_settings=auto.ProjectSettings(name=project,
                                                                                                    runtime="python")))

        def denied(call, *args, **kwargs) -> bool:
            try:
                call(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - botocore ClientError or the CLI's CommandError
                return "AccessDenied" in str(exc) or "403" in str(exc) or "Forbidden" in str(exc)
            return False

        # -- the runner: a new stack (a shard), updates with refresh, export/import (pending operations)
        runner = engine("runner")
        assert runner.up(refresh=True, color="never").summary.result == "succeeded"
        assert runner.up(refresh=True, color="never").summary.result == "succeeded"
        assert runner.outputs()["v"].value == "s"
        runner.import_stack(runner.export_stack())
        assert [s.name for s in runner.workspace.list_stacks()] == ["state-iam"]
        as_runner = boto3.client("s3", **aws, **keys["runner"])
        lock = ".pulumi/locks/organization/gco-infra/state-iam/dead.json"
        as_runner.put_object(Bucket="gco-state", Key=lock, Body=b"{}")  # what recovering a dead lock does
        listed = as_runner.list_objects_v2(Bucket="gco-state", Prefix=".pulumi/locks/organization/gco-infra/state-iam/")
        assert [o["Key"] for o in listed["Contents"]] == [lock]
        as_runner.get_object(Bucket="gco-state", Key=lock)
        as_runner.delete_object(Bucket="gco-state", Key=lock)
        assert denied(as_runner.put_object, Bucket="gco-state", Key=".pulumi/meta.yaml", Body=b"version: 0\n")
        assert denied(as_runner.delete_object, Bucket="gco-state", Key=".pulumi/stacks/gco-infra/state-iam.json")
        assert denied(engine, "runner", project="gco-platform", name="prod")  # the platform's state is not its own
        # its own region's shards are its own; another region's stacks and locks are not
        shard_lock = ".pulumi/locks/organization/gco-infra/state-iam.shard-1/x.json"
        as_runner.put_object(Bucket="gco-state", Key=shard_lock, Body=b"{}")
        as_runner.delete_object(Bucket="gco-state", Key=shard_lock)
        assert denied(as_runner.put_object, Bucket="gco-state", Key=".pulumi/stacks/gco-infra/eu-west-1.json", Body=b"{}")
        assert denied(as_runner.delete_object, Bucket="gco-state",
                      Key=".pulumi/locks/organization/gco-infra/eu-west-1/x.json")
        assert denied(engine, "runner", name="eu-west-1")

        # -- the preview: lists, reads outputs and previews with a refresh, takes no lock; cannot update
        preview = engine("preview")
        assert [s.name for s in preview.workspace.list_stacks()] == ["state-iam"]
        assert preview.outputs()["v"].value == "s"
        assert preview.preview(refresh=True, color="never").change_summary == {"same": 1}
        assert denied(preview.up, color="never")
        assert denied(engine, "preview", name="new-stack")
        as_preview = boto3.client("s3", **aws, **keys["preview"])
        assert denied(as_preview.put_object, Bucket="gco-state", Key=lock, Body=b"{}")
        assert denied(as_preview.get_object, Bucket="gco-state", Key=".pulumi/history/gco-infra/state-iam/x.json")
        assert runner.up(color="never").summary.result == "succeeded"  # the preview left no lock behind
    finally:
        localenv.stop_pid(pid, "moto_server")
