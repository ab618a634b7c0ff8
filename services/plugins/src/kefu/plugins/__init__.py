"""kefu plugins service: plugin modules with manifests, answering tool calls; reloaded on SIGHUP."""
