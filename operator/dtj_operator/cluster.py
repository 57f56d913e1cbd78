"""The only module that talks to the Kubernetes API (official client).

Thin verbs with the conflict handling reconcile needs: create-if-absent
(409 is success), delete-if-present (404 is success), status merge patches.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import api, metrics

log = logging.getLogger(__name__)


# Every request ends within this (connect, read) many seconds: a black-holed connection
# cannot hang a pass thread (or the leader's renewals) for good; the pass fails, the
# queue retries it with backoff, and a new connection is made.
REQUEST_TIMEOUT = (10.0, 60.0)
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


class _CountingApiClient(client.ApiClient):
    """Counts every request in dtj_operator_api_requests_total, by method, and bounds
    each by `timeout` (connect, read seconds) unless the call set its own."""

    timeout: tuple[float, float] = REQUEST_TIMEOUT

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        metrics.API_REQUESTS.labels(method=method.upper()).inc()
        if len(args) < 4 and kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.timeout
        return super().call_api(method, url, *args, **kwargs)


def timed_client(timeout: tuple[float, float] = REQUEST_TIMEOUT) -> client.ApiClient:
    """An API client whose every request ends within `timeout`."""
    api_client = _CountingApiClient()
    api_client.timeout = timeout
    return api_client


def _unparsed(call: Any, *args: Any, **kwargs: Any) -> None:
    """Make the request without parsing the object the server echoes back (the
    operator does not read it; parsing pods into models costs more than sending)."""
    call(*args, _preload_content=False, **kwargs).read()


class Cluster:
    def __init__(self) -> None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._api = timed_client()
        self.core = client.CoreV1Api(self._api)
        self.rbac = client.RbacAuthorizationV1Api(self._api)
        self.networking = client.NetworkingV1Api(self._api)
        self.custom = client.CustomObjectsApi(self._api)

    def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj` unless it exists; True when this call created it."""
        ns = obj["metadata"]["namespace"]
        create: Any = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "NetworkPolicy": self.networking.create_namespaced_network_policy,
        }[obj["kind"]]
        try:
            _unparsed(create, ns, obj)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def owners(self, kind: str, namespace: str, name: str) -> list[str] | None:
        """The owner uids of that object, or None if it is gone."""
        read: Any = {
            "Service": self.core.read_namespaced_service,
            "ConfigMap": self.core.read_namespaced_config_map,
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
            "NetworkPolicy": self.networking.read_namespaced_network_policy,
        }[kind]
        try:
            obj = read(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return [r.uid for r in obj.metadata.owner_references or []]

    def update_network_policy(self, namespace: str, name: str, obj: dict[str, Any]) -> None:
        """Its spec (and the digest annotation) as `obj` has them: a merge patch replaces
        the rule lists whole."""
        patch = {"metadata": {"annotations": obj["metadata"]["annotations"]}, "spec": obj["spec"]}
        _unparsed(self.networking.patch_namespaced_network_policy, name, namespace, patch)

    def patch_config_map(self, namespace: str, name: str, data: dict[str, str]) -> None:
        _unparsed(self.core.patch_namespaced_config_map, name, namespace, {"data": data})

    def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete that pod (that `uid`: not a replacement of the same name); True when
        the request was accepted, False when it was already gone or replaced."""
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
        try:
            _unparsed(self.core.delete_namespaced_pod, name, namespace, body=options)
        except ApiException as e:
            if e.status in (404, 409):  # gone, or replaced by a new pod of that name
                return False
            raise
        return True

    def evict_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Evict that pod (the Eviction API: PodDisruptionBudgets apply); True when it
        goes (or is gone), False when a budget refuses it for now (429)."""
        body = client.V1Eviction(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace),
            delete_options=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)),
        )
        try:
            _unparsed(self.core.create_namespaced_pod_eviction, name, namespace, body)
        except ApiException as e:
            if e.status == 429:
                return False
            if e.status in (404, 409):  # gone, or replaced by a new pod of that name
                return True
            raise
        return True

    def release(self, pod: dict[str, Any], finalizer: str) -> None:
        """Remove `finalizer` from that pod (a JSON patch that tests it is still there,
        so a concurrent change makes it fail instead of dropping someone else's)."""
        meta = pod["metadata"]
        finalizers = meta.get("finalizers") or []
        if finalizer not in finalizers:
            return
        i = finalizers.index(finalizer)
        path = f"/metadata/finalizers/{i}"
        ops = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},  # not a namesake
            {"op": "test", "path": path, "value": finalizer},
            {"op": "remove", "path": path},
        ]
        try:
            _unparsed(self.core.patch_namespaced_pod, meta["name"], meta["namespace"], ops)
        except ApiException as e:
            if e.status not in (404, 409, 422):  # gone, or changed: the next pass looks again
                raise

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
        """Merge `annotations` into the pod's (None removes one)."""
        try:
            patch = {"metadata": {"annotations": annotations}}
            _unparsed(self.core.patch_namespaced_pod, name, namespace, patch)
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch the status; with `resource_version`, only if nobody wrote since.
        Returns the job as written (fresher than the watch cache for a moment)."""
        patch: dict[str, Any] = {"status": status}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        out: Any = self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, patch
        )
        return dict(out)

    def warn(self, body: dict[str, Any], reason: str, message: str) -> None:
        """A Warning Event on the job (`kubectl describe dtj` and `kubectl get events`)."""
        self.event(body, "Warning", reason, message)

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """An Event on the job (`kubectl describe dtj` and `kubectl get events`)."""
        meta = body["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=api.API_VERSION,
                kind=api.KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=client.V1EventSource(component="dtj-operator"),
            reporting_component="dtj-operator",
            reporting_instance=socket.gethostname(),
        )
        try:
            _unparsed(self.core.create_namespaced_event, meta["namespace"], event)
        except ApiException as e:  # an Event is a courtesy: never fail a pass for it
            log.warning("could not post event %s on %s: %s", reason, meta["name"], e.reason)

    def pod_uids(self, selector: str, namespace: str | None = None) -> set[str]:
        """The uids of the pods `selector` matches now (in `namespace`, or all): their
        metadata only (PartialObjectMetadataList), however many pods there are."""
        kw: dict[str, Any] = {
            "label_selector": selector,
            "_preload_content": False,
            "_headers": {"Accept": METADATA_LIST},
        }
        resp: Any = (
            self.core.list_namespaced_pod(namespace, **kw)
            if namespace
            else self.core.list_pod_for_all_namespaces(**kw)
        )
        items = json.loads(resp.read()).get("items") or []
        return {i["metadata"]["uid"] for i in items}

    def job_exists(self, namespace: str, name: str) -> bool:
        try:
            self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                propagation_policy="Background",
            )
        except ApiException as e:
            if e.status != 404:
                raise
