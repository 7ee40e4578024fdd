"""Ray Serve deployments: the model server (``server``), the HTTP ingress (``ingress``), the engine protocol over
a handle (``client``) and the app builder with ``deploy()`` (``builder``)."""
