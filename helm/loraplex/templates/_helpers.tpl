{{/* Names are fixed (one operator per cluster, or per namespace in namespace scope) so the
plain manifests generated from this chart read the same as a Helm install. */}}
{{- define "loraplex.name" -}}loraplex-operator{{- end }}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default "loraplex-operator" }}
{{- else }}{{ required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: loraplex-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraplex.labels" -}}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/part-of: loraplex
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "loraplex.sampleLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: loraplex
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "loraplex.image" -}}
{{ .repository }}:{{ .tag | default .appVersion }}
{{- end }}

{{/* The namespaces the operator watches in namespace scope. */}}
{{- define "loraplex.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}{{ toJson .Values.watchNamespaces }}{{ else }}{{ toJson (list .Release.Namespace) }}{{ end }}
{{- end }}

{{/* What the operator touches inside the namespaces it watches (least privilege, derived from
what it renders: tests/operator/test_rbac.py). No pods/exec, no wildcards, Secrets one by one. */}}
{{- define "loraplex.namespacedRules" -}}
# Our resources: watched, annotated (attachment, kopf progress), finalized, status written.
- apiGroups: [loraplex.dev]
  resources: [basemodeldeployments, loraadapters]
  verbs: [get, list, watch, patch, update]
- apiGroups: [loraplex.dev]
  resources: [basemodeldeployments/status, loraadapters/status]
  verbs: [get, patch, update]
# Children, written with server-side apply and garbage-collected by owner reference.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, create, patch, delete]
# Server pods: indexed, and the readiness-gate condition set on their status.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods/status]
  verbs: [patch]
# Secrets: API keys read one by one (no list/watch), and the `<bmd>-access` Secret of key
# digests written for the pods.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
# spec.autoscaling: an HPA or a KEDA ScaledObject, and the unwanted one deleted.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, create, patch, delete]
# kopf: events on warnings.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* Cluster-scoped reads the operator needs in either scope. */}}
{{- define "loraplex.clusterRules" -}}
# Adapter admission by namespace labels (adapterNamespaces.from: Selector).
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
# kopf: CRD discovery.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
{{- end }}
