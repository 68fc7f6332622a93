"""The HTTP gateway (`refinery gateway`): tenants, quotas and the job contract over HTTP."""
