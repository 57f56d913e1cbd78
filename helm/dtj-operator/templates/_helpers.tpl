{{- define "dtj-operator.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dtj-operator.serviceAccountName" -}}
{{- default (include "dtj-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "dtj-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dtj-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* One namespace (no pattern): the operator's rights there come from a Role. */}}
{{- define "dtj-operator.namespaced" -}}
{{- $ns := .Values.watchNamespace -}}
{{- if and $ns (not (contains "*" $ns)) (not (contains "," $ns)) (not (contains "?" $ns)) -}}
true
{{- end -}}
{{- end -}}

{{/* What reconcile does to the jobs and their children: exactly the verbs it uses
(see dtj_operator/cluster.py), in a Role (one namespace) or the ClusterRole. */}}
{{- define "dtj-operator.jobRules" -}}
- apiGroups: ["training.dtj.io"]
  resources: ["decentralizedtrainingjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]  # get: is a job gone (a 404 seen)
- apiGroups: ["training.dtj.io"]
  resources: ["decentralizedtrainingjobs/status"]
  # get: granted to each job's coordinator by a Role, which needs the operator to hold it.
  verbs: ["get", "patch"]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: ["training.dtj.io"]
  resources: ["decentralizedtrainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete", "patch"]  # patch: tracking finalizer, move-away note
# Workers leave a drained node a few at a time, through the Eviction API (PDBs apply).
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  # list, watch: the operator's cache; get: whose is an object that has a child's name
  verbs: ["get", "list", "watch", "create", "patch"]
# Each job's NetworkPolicy: only its own pods reach its ports.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]  # patch: a changed policy reaches old jobs
# Each job's coordinator may patch that job's status (progress); granting it
# needs the same permission here, which the operator has anyway.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* The operator image: a digest wins over the tag; the tag defaults to appVersion. */}}
{{- define "dtj-operator.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}
