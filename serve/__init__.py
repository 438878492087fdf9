"""dmm-ray Ray Serve application: `serve run serve.app` (module `serve`, attribute `app`).

`app` is the bound application (router -> batched model), built from the environment
($DMM_MODEL, $DMM_API_KEY, $DMM_SERVE_CONFIG); `build_app` is the builder for
`serve run serve:build_app key=value` and for Serve config files.
"""

from serve.app import app, build_app  # noqa: F401  (rebinds `serve.app` to the Application)

__all__ = ["app", "build_app"]
