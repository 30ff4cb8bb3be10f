"""The bare floor: Falcon answering constant JSON, run under the appliance's gunicorn settings.

It reads the body like a real handler would, and does nothing else: no validation, no model,
no logging, no metrics. What the appliance costs on top of it is the price of its features.
"""

import falcon

BODY = (
    b'{"model_name":"tabular","model_version":"2","outputs":[{"name":"label",'
    b'"datatype":"INT64","shape":[1],"data":[1]}]}'
)


class Constant:
    def on_post(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        req.bounded_stream.read()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = BODY

    def on_get(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        resp.data = b'{"ok":true}'


app = falcon.App()
app.add_route("/v2/models/{name}/infer", Constant())
app.add_route("/health", Constant())
