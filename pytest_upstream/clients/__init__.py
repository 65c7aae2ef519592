"""Pointing clients at the proxy: in-process routing of requests/httpx/urllib, the URL to
proxy-path mapping, Maven settings.xml and containers registries.conf."""
