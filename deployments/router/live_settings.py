"""The router replica's current settings, where its ASGI middleware can read them.

The middleware (body size limit, strict JSON, API keys, CORS) is built with the
FastAPI app before any replica exists, and Serve applies a new ``user_config``
to a running replica (``Router.reconfigure``) without rebuilding it. So the
middleware reads the settings per request from the app's state, which the
replica sets (``publish``) on start and on every reconfigure.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware

from deployments.router.settings import CorsSettings, RouterSettings

_STATE_KEY = "router_settings"
_DEFAULT = RouterSettings()


def publish(app, settings: RouterSettings) -> None:
    """Make ``settings`` the ones every later request through ``app`` sees."""
    setattr(app.state, _STATE_KEY, settings)


def current(scope) -> RouterSettings:
    """The settings for this request: the replica's published ones (the defaults before any)."""
    app = scope.get("app")
    return getattr(getattr(app, "state", None), _STATE_KEY, None) or _DEFAULT


class LiveCors:
    """ASGI middleware: Starlette's CORSMiddleware for the origins configured now (none: no CORS headers
    at all, so browsers keep other origins' pages out). One CORSMiddleware per distinct origin list."""

    def __init__(self, app):
        self.app = app
        self._built: dict[tuple[str, ...], object] = {}

    def _for(self, cors: CorsSettings):
        origins = tuple(cors.allow_origins)
        if not origins:
            return self.app
        if origins not in self._built:
            self._built = {origins: CORSMiddleware(self.app, allow_origins=list(origins),
                                                   allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])}
        return self._built[origins]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self._for(current(scope).cors)(scope, receive, send)
