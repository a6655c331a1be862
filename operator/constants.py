"""Names shared by the CRD, the renderer, the controller and the manifests.

Changing any of these is an API change: labels and selectors are immutable on live Deployments.
"""

from __future__ import annotations

GROUP = "serving.metroline.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ("llmd",)

FIELD_MANAGER = "metroline-operator"
"""The one field manager under which every child is server-side applied."""

# Labels. The selector labels never change for the life of an LLMDeployment.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_OWNER = f"{GROUP}/llmdeployment"
APP_NAME = "metroline"
MANAGED_BY = FIELD_MANAGER
RESERVED_LABELS = frozenset(
    {LABEL_NAME, LABEL_INSTANCE, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_OWNER}
)
RESERVED_ENV = frozenset({
    "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN",
    "NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
})
"""Environment variables spec.env may not set: the HF_* ones the operator sets in the engine or
download container; the GPU ones because the GPU device plugin and the container runtime
choose the pod's GPUs with them (``NVIDIA_VISIBLE_DEVICES=all`` in a pod's own env makes a
runtime that honours it for unprivileged pods expose every GPU of the node)."""
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
"""On every child: a hash of the configuration the operator applied (see render.stamp)."""

# The engine's HTTP contract (docs/serving.md).
HTTP_PORT = 8000
HTTP_PORT_NAME = "http"
HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
KV_METRIC = "metroline:kv_cache_usage_perc"
WAITING_METRIC = "metroline:num_requests_waiting"
RUNNING_METRIC = "metroline:num_requests_running"
STEP_TOKENS_METRIC = "metroline:iteration_tokens_total"
"""A histogram of tokens per engine step: ``_sum`` and ``_count`` give the mean per step."""
ENGINE_DRAIN_TIMEOUT_S = 30
"""The engine's default --drain-timeout: SIGTERM waits this long for in-flight requests."""

DEFAULT_ENGINE_IMAGE = "ghcr.io/metroline/engine:0.1.0"
ENGINE_CONTAINER = "engine"
DOWNLOAD_CONTAINER = "download-model"
RUN_AS_USER = 1000

# Paths inside the engine pod.
CACHE_MOUNT = "/var/cache/metroline"
MODELS_DIR = f"{CACHE_MOUNT}/models"
HF_HOME = f"{CACHE_MOUNT}/huggingface"
PVC_MODEL_MOUNT = "/mnt/model"
SHM_MOUNT = "/dev/shm"

# The activator (operator/activator.py): where the Service sends traffic while no engine pod is
# ready after a scale to zero (an EndpointSlice of the Service pointing at the leader's pod).
ACTIVATOR_PORT = 8082
ACTIVATOR_PORT_NAME = "activator"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
