"""Per-request context carried in contextvars (request id, trace id, caller), read by logs."""

from __future__ import annotations

import contextvars

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("aiaas_request_id", default="")
trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("aiaas_trace_id", default="")
method_var: contextvars.ContextVar[str] = contextvars.ContextVar("aiaas_method", default="")
# The verified identity of the internal caller (services/common/authz.py); "anonymous" when the
# service does not require one and none was presented.
caller_var: contextvars.ContextVar[str] = contextvars.ContextVar("aiaas_caller", default="anonymous")
