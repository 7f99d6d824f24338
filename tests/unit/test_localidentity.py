"""The local pod-identity webhook's mutation (the contract of amazon-eks-pod-identity-webhook's IRSA
injection), without a cluster; the e2e tests run it with real pods."""

from __future__ import annotations

import base64
import json

from gco_infra.localidentity import ROLE_ANNOTATION, SKIP_CONTAINERS, TOKEN_DIR, TOKEN_VOLUME, Webhook, patch_for
from gco_infra.manifests import MODEL_SYNC_CONTAINER, SERVING_CONTAINER

ROLE = "arn:aws:iam::123456789012:role/gco-model-sync"


def pod(skip: str | None = SERVING_CONTAINER, env=None):
    annotations = {SKIP_CONTAINERS: skip} if skip is not None else {}
    return {"metadata": {"annotations": annotations},
            "spec": {"serviceAccountName": "gco-service-account",
                     "initContainers": [{"name": MODEL_SYNC_CONTAINER, "image": "aws"}],
                     "containers": [{"name": SERVING_CONTAINER, "image": "srv", "env": env or [{"name": "A", "value": "1"}]}],
                     "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "efs-claim"}}]}}


def apply(p, ops):
    out = json.loads(json.dumps(p))
    for op in ops:
        assert op["op"] == "add"
        _, _, field = op["path"].rpartition("/")
        out["spec"][field] = op["value"]
    return out


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env") or []}


def test_skipped_containers_get_nothing_and_the_others_the_roles_web_identity():
    mutated = apply(pod(), patch_for(pod(), ROLE, "sts.amazonaws.com", {"AWS_ENDPOINT_URL": "http://moto"}))
    sync, = mutated["spec"]["initContainers"]
    serving, = mutated["spec"]["containers"]
    assert env_of(sync) == {"AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": f"{TOKEN_DIR}/token",
                            "AWS_STS_REGIONAL_ENDPOINTS": "regional", "AWS_ENDPOINT_URL": "http://moto"}
    assert sync["volumeMounts"] == [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}]
    assert env_of(serving) == {"A": "1"} and "volumeMounts" not in serving
    token, = [v for v in mutated["spec"]["volumes"] if v["name"] == TOKEN_VOLUME]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "sts.amazonaws.com"
    assert {v["name"] for v in mutated["spec"]["volumes"]} == {"models", TOKEN_VOLUME}


def test_without_skip_annotation_every_container_gets_it_and_a_containers_own_role_wins():
    own = [{"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::1:role/own"}]
    p = pod(skip=None, env=own)
    mutated = apply(p, patch_for(p, ROLE, "sts.amazonaws.com", {}))
    assert env_of(mutated["spec"]["initContainers"][0])["AWS_ROLE_ARN"] == ROLE
    assert env_of(mutated["spec"]["containers"][0]) == {"AWS_ROLE_ARN": "arn:aws:iam::1:role/own"}


def test_every_container_skipped_means_no_patch():
    p = pod(skip=f"{SERVING_CONTAINER}, {MODEL_SYNC_CONTAINER}")
    assert patch_for(p, ROLE, "sts.amazonaws.com", {}) == []


def test_review_patches_only_pods_whose_service_account_names_a_role():
    accounts = {("local-1", "ns", "gco-service-account"): {"metadata": {"annotations": {ROLE_ANNOTATION: ROLE}}},
                ("local-1", "ns", "plain"): {"metadata": {}}}
    hook = Webhook(lambda r, n, a: accounts.get((r, n, a)), {})
    with_role = hook.review("local-1", {"request": {"uid": "u1", "namespace": "ns", "object": pod()}})["response"]
    assert with_role["uid"] == "u1" and with_role["allowed"] and with_role["patchType"] == "JSONPatch"
    assert any(op["path"] == "/spec/initContainers" for op in json.loads(base64.b64decode(with_role["patch"])))
    plain = pod()
    plain["spec"]["serviceAccountName"] = "plain"
    without = hook.review("local-1", {"request": {"uid": "u2", "namespace": "ns", "object": plain}})["response"]
    assert without == {"uid": "u2", "allowed": True}
    unknown = hook.review("local-1", {"request": {"uid": "u3", "namespace": "other", "object": pod()}})["response"]
    assert unknown == {"uid": "u3", "allowed": True}  # no such account: admitted unchanged, as EKS does
