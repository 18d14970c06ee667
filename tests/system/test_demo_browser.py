"""`emotion-dist demo` as a real process, driven by a real browser (headless Debian Chromium through
selenium): the astronaut uploaded through the file input gets its box and label drawn; the camera
button with Chromium's fake camera streams frames that are posted and answered at a bounded rate;
the page loads nothing from outside; Ctrl-C stops the server cleanly. And with an .onnx model the
server never imports torch (the real process, under `python -X importtime`).

In CI (CI set) the browser test runs or fails; elsewhere it skips only when Chromium is absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cli_cmd, env_for_child

pytest.importorskip("fastapi", reason="the demo extra is not installed (pip install -e '.[demo]')")

PHOTOS = Path(__import__("skimage.data", fromlist=["data"]).__file__).parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BOX_GREEN = (40, 220, 40)  # demo.js's box colour, #28dc28
README_SHOT = ROOT / "docs" / "images" / "demo.png"


def browser_or_skip():
    """selenium's webdriver module, or a skip saying what is missing (a failure in CI)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package (the dev extra)")
    if missing:
        reason = (f"no browser for the demo test: {', '.join(missing)} missing "
                  "(apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the demo's browser test: {reason}")
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return webdriver


class Demo:
    """`emotion-dist demo --port 0` as a process; `url` from its start line."""

    def __init__(self, checkpoint: Path, *extra: str, python_flags: tuple = ()):
        cmd = cli_cmd("demo", "--checkpoint", str(checkpoint), "--port", "0", *extra)
        self.proc = subprocess.Popen([cmd[0], *python_flags, *cmd[1:]], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env_for_child(), cwd=ROOT)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = [None]
        reader = threading.Thread(target=lambda: line.__setitem__(0, self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        if not line[0]:
            self.proc.kill()
            raise AssertionError(f"the demo printed no start line in 60 s: {''.join(self.stderr)[-2000:]}")
        self.start_line = line[0].strip()
        self.url = self.start_line.split("http://", 1)[1].split("/", 1)[0]
        self.url = f"http://{self.url}/"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> int:
        """Ctrl-C, as a person at the terminal would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the demo did not stop within 30 s of Ctrl-C") from None


def chromium(webdriver, shots: Path, camera: Path):
    """Headless Chromium whose fake camera plays `camera` (a .y4m clip) to getUserMedia."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={camera}", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(shots / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=options)


def write_camera_clip(path: Path) -> Path:
    """A one-frame 640 x 480 Y4M clip of the astronaut (Chromium loops it as the fake camera)."""
    import cv2
    import numpy as np
    from PIL import Image

    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, 80:560] = np.asarray(Image.open(PHOTOS / "astronaut.png").convert("RGB").resize((480, 480)))
    yuv = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
    path.write_bytes(b"YUV4MPEG2 W640 H480 F30:1 Ip A1:1 C420jpeg\nFRAME\n" + yuv.tobytes())
    return path


def write_two_faces(path: Path) -> Path:
    """The astronaut and her mirror image side by side: two faces to choose between."""
    from PIL import Image, ImageOps

    one = Image.open(PHOTOS / "astronaut.png").convert("RGB")
    both = Image.new("RGB", (one.width * 2, one.height))
    both.paste(one, (0, 0))
    both.paste(ImageOps.mirror(one), (one.width, 0))
    both.save(path)
    return path


def wait_for(driver, script: str, timeout: float, what: str):
    """Poll a JavaScript expression until it is truthy; fail naming `what` and the page's status line."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.1)
    status = driver.execute_script("return document.getElementById('status').textContent;")
    raise AssertionError(f"{what} did not happen within {timeout} s (status line: {status!r})")


def pixel(driver, x: float, y: float) -> tuple:
    return tuple(driver.execute_script(
        "const c = document.getElementById('view');"
        "return Array.from(c.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data).slice(0, 3);",
        int(x), int(y)))


def is_box_green(rgb) -> bool:
    return all(abs(a - b) <= 30 for a, b in zip(rgb, BOX_GREEN))


def test_upload_and_camera_in_a_real_browser(tmp_path, tiny_model):
    webdriver = browser_or_skip()
    from concurrent.futures import ThreadPoolExecutor

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    camera = write_camera_clip(tmp_path / "camera.y4m")
    with ThreadPoolExecutor(1) as pool:  # Chromium starts while the server loads its model
        browser = pool.submit(chromium, webdriver, tmp_path, camera)
        demo = Demo(tiny_model.pt)  # trained a few steps: its outputs depend on the picture
        driver = browser.result()
    try:
        assert "127.0.0.1" in demo.start_line and "only this machine" in demo.start_line
        driver.get(demo.url)
        wait_for(driver, "document.getElementById('model-classes').textContent", 15, "the model's classes shown")
        assert "happy" in driver.find_element(By.ID, "model-classes").text
        assert "RetinaFace" in driver.find_element(By.ID, "model-detector").text
        classes = demo.get("/api/model")["classes"]

        # --- upload the astronaut through the file input: her box and label drawn on the canvas
        driver.find_element(By.ID, "file").send_keys(str(PHOTOS / "astronaut.png"))
        wait_for(driver, "document.body.dataset.faces === '1'", 30, "one face from the upload")
        face = driver.find_element(By.CSS_SELECTOR, "#faces li")
        assert face.get_attribute("data-label") in classes
        assert face.text.startswith(face.get_attribute("data-label"))
        x, y, w, h = map(int, face.get_attribute("data-box").split(","))
        size = driver.execute_script("const c = document.getElementById('view'); return [c.width, c.height];")
        assert size == [512, 512]  # the canvas holds the photo at its own size, boxes in its pixels
        assert 150 < x < 220 and 40 < y < 110 and 60 < w < 140
        assert is_box_green(pixel(driver, x, y + h // 2))  # the box's left edge
        assert not is_box_green(pixel(driver, x + w // 2, y + h // 2))  # her face itself, not painted over
        assert is_box_green(pixel(driver, x + 6, y - 6))  # the label's background, above the box
        bars = driver.find_elements(By.CSS_SELECTOR, "#chart .bar")
        assert [b.get_attribute("data-class") for b in bars] == classes
        driver.save_screenshot(str(tmp_path / "demo_upload.png"))

        # --- the Grad-CAM toggle: the same photo again, the map drawn over her face, the box still on top
        assert "backbone.6" in driver.find_element(By.ID, "explain-label").get_attribute("title")
        centre, corner = pixel(driver, x + w // 2, y + h // 2), pixel(driver, 20, 500)
        driver.find_element(By.ID, "explain").click()
        wait_for(driver, "document.body.dataset.cam === 'shown'", 30, "the Grad-CAM overlay shown")
        assert max(abs(a - b) for a, b in zip(pixel(driver, x + w // 2, y + h // 2), centre)) > 40
        assert max(abs(a - b) for a, b in zip(pixel(driver, 20, 500), corner)) < 25  # far from the face: the photo
        assert is_box_green(pixel(driver, x, y + h // 2))
        driver.save_screenshot(str(tmp_path / "demo_cam.png"))
        driver.find_element(By.ID, "explain").click()
        wait_for(driver, "document.body.dataset.cam === 'off'", 30, "the plain photo again")
        assert max(abs(a - b) for a, b in zip(pixel(driver, x + w // 2, y + h // 2), centre)) < 25

        # --- two faces: a click on the second box chooses it, and the chart shows its probabilities
        driver.find_element(By.ID, "file").send_keys(str(write_two_faces(tmp_path / "pair.png")))
        wait_for(driver, "document.body.dataset.faces === '2'", 30, "two faces from the upload")
        expected = [{"box": list(map(int, li.get_attribute("data-box").split(","))),
                     "probabilities": json.loads(li.get_attribute("data-probabilities"))}
                    for li in driver.find_elements(By.CSS_SELECTOR, "#faces li")]
        assert expected[0]["probabilities"] != expected[1]["probabilities"]  # the mirror image reads differently
        second = max(range(2), key=lambda i: expected[i]["box"][0])  # the one on the right
        bx, by, bw, bh = expected[second]["box"]
        view = driver.find_element(By.ID, "view")
        rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                     "return [r.width, r.height];", view)
        scale = rect[0] / 1024
        ActionChains(driver).move_to_element_with_offset(
            view, int((bx + bw / 2) * scale - rect[0] / 2), int((by + bh / 2) * scale - rect[1] / 2)).click().perform()
        # read in one script: the page re-renders the list and chart, so element handles may go stale
        wait_for(driver, f"document.querySelectorAll('#faces li')[{second}]?.classList.contains('chosen')", 10,
                 "the clicked face chosen")
        chosen = driver.execute_script(
            "return [...document.querySelectorAll('#faces li')].map(li => li.classList.contains('chosen'));")
        assert chosen == [i == second for i in range(2)]
        shown = driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#chart .bar')].map("
            "b => [b.dataset.class, b.querySelector('.value').textContent]));")
        assert shown == {c: f"{expected[second]['probabilities'][c]:.3f}" for c in classes}

        # --- the camera: Chromium's fake device plays the astronaut; frames posted, answered, boxed
        driver.find_element(By.ID, "camera").click()
        wait_for(driver, "document.body.dataset.camera === 'on'", 10, "the camera turned on")
        started, before = time.monotonic(), int(driver.execute_script("return document.body.dataset.sent;"))
        wait_for(driver, f"Number(document.body.dataset.answered) >= {before} + 4", 15, "four camera frames answered")
        wait_for(driver, "document.body.dataset.faces === '1'", 10, "her face found in a camera frame")
        elapsed = time.monotonic() - started
        sent, answered = (int(driver.execute_script(f"return document.body.dataset.{k};"))
                          for k in ("sent", "answered"))
        assert sent - answered <= 1  # never more than one request in flight
        assert sent - before <= 4 * elapsed + 2, (sent - before, elapsed)  # at most 4 frames a second
        # one script: each answered camera frame re-renders the list, so an element handle may go stale
        x, y, w, h = map(int, driver.execute_script(
            "return document.querySelector('#faces li')?.dataset.box ?? '0,0,0,0';").split(","))
        assert 80 + 150 < x < 80 + 220  # in the video's pixels: the photo sits 80 px in, at 480 of 512
        assert is_box_green(pixel(driver, x, y + h // 2))  # drawn over the live video
        assert "camera on" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "demo_camera.png"))

        # nothing from outside: every resource the page loaded is this server's, no console errors
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        assert resources and all(r.startswith(demo.url) for r in resources), resources
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.find_element(By.ID, "camera").click()
        wait_for(driver, "document.body.dataset.camera === 'off'", 10, "the camera turned off")

        # the API docs render offline: Swagger UI from this server, the schema's routes listed
        driver.get(demo.url + "docs")
        wait_for(driver, "document.querySelectorAll('.opblock').length >= 3", 15, "Swagger UI listing the routes")
        assert "/api/predict" in driver.find_element(By.ID, "swagger-ui").text
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        assert all(r.startswith(demo.url) for r in resources), resources
    finally:
        driver.quit()
        code = demo.stop()
    assert code == 0, "".join(demo.stderr)[-2000:]
    assert "Traceback" not in "".join(demo.stderr), "".join(demo.stderr)[-2000:]
    if os.environ.get("EMOTION_DIST_README_SHOT"):  # refresh the README's picture: docs/demo.md says how
        shutil.copy(tmp_path / "demo_camera.png", README_SHOT)


def post_file(demo: Demo, path: Path) -> dict:
    body, boundary = multipart(path)
    request = urllib.request.Request(demo.url + "api/predict", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_onnx_demo_never_imports_torch(tiny_model):
    """The real server with an exported model: every module it imported, printed by -X importtime."""
    demo = Demo(tiny_model.onnx, python_flags=("-X", "importtime"))
    try:
        assert demo.get("/api/model")["format"] == "onnx"
        document = post_file(demo, PHOTOS / "astronaut.png")
        assert document["emotion_dist"] == "predict" and len(document["faces"]) == 1
    finally:
        code = demo.stop()
    assert code == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in demo.stderr if line.startswith("import time:")]
    assert "onnxruntime" in imported and "fastapi" in imported  # the log is complete
    assert not [m for m in imported if m.split(".")[0] in ("torch", "ultralytics", "torchvision")]


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = "emotiondistdemotest"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), boundary
