// The emotion-dist demo page: upload a photo or stream the visitor's own camera (getUserMedia) to
// POST /api/predict, then draw each face's box with its label and score on the canvas and a bar chart
// of the chosen face's probabilities. Camera frames go at most FRAMES_PER_SECOND a second and never
// more than one request at a time. With "Grad-CAM" ticked, each request asks for the maps too
// (?cam=true) and the canvas shows the server's overlay under the boxes. No library, nothing loaded
// from outside this server.
"use strict";

const FRAMES_PER_SECOND = 4;
const FRAME_SIDE = 640; // camera frames are sent at most this wide or high (JPEG)
const BOX = "#28dc28", CHOSEN = "#ffb400";

const view = document.getElementById("view");
const ctx = view.getContext("2d");
const video = document.getElementById("video");
const cameraButton = document.getElementById("camera");
const statusLine = document.getElementById("status");
const facesList = document.getElementById("faces");
const chart = document.getElementById("chart");
const explain = document.getElementById("explain");

let classes = [];
let picture = null;      // what the canvas shows under the boxes: an ImageBitmap/Image, or the video
let explanation = null;  // the last answer's Grad-CAM overlay (an Image), shown instead while ticked
let lastFile = null;     // the upload on the canvas, sent again when the toggle changes
let faces = [];          // the last answer's faces, boxes in canvas pixels
let chosen = 0;          // index of the face whose probabilities the chart shows
let stream = null;       // the camera's MediaStream while it is on
let inFlight = false;
let lastSent = 0;
let counts = { sent: 0, answered: 0 };

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function count(key) {
  counts[key] += 1;
  document.body.dataset[key] = String(counts[key]);
}

async function loadModel() {
  try {
    const r = await fetch("/api/model");
    const m = await r.json();
    classes = m.classes || [];
    document.getElementById("model-name").textContent = `${m.name} (${m.format}, ${m.image_size} px, ${m.in_channels === 1 ? "gray" : "RGB"})`;
    document.getElementById("model-classes").textContent = classes.join(", ");
    document.getElementById("model-detector").textContent = m.detector;
    const t = m.metrics && m.metrics.test;
    const v = m.metrics && m.metrics.best_val_macro_f1;
    let figures = t ? `accuracy ${fmt(t.accuracy)}, macro-F1 ${fmt(t.macro_f1)} on ${t.count ?? "?"} test images (${t.checkpoint || "best.pt"})` : "none recorded";
    if (v !== null && v !== undefined) figures += ` · best validation macro-F1 ${fmt(v)}`;
    document.getElementById("model-metrics").textContent = figures;
    const cam = m.cam || {};
    explain.disabled = !cam.available;
    document.getElementById("explain-label").title = cam.available ? `${cam.method} at layer ${cam.layer}` : (cam.why || "");
  } catch (e) {
    say(`could not read /api/model: ${e}`, true);
  }
}

function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "?"; }

// ---------------------------------------------------------------------------------- drawing
function draw() {
  const under = explain.checked && explanation ? explanation : picture;
  if (under) {
    ctx.drawImage(under, 0, 0, view.width, view.height);
  } else {
    ctx.fillStyle = "#222";
    ctx.fillRect(0, 0, view.width, view.height);
  }
  const thick = Math.max(2, Math.round(Math.max(view.width, view.height) / 300));
  const size = Math.max(14, Math.round(Math.max(view.width, view.height) / 40));
  ctx.font = `${size}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  faces.forEach((f, i) => {
    const [x, y, w, h] = f.box;
    const colour = i === chosen && faces.length > 1 ? CHOSEN : BOX;
    ctx.lineWidth = thick;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x, y, w, h);
    const text = `${f.label} ${f.probability.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 8;
    const ty = Math.max(size + 4, y - thick);
    ctx.fillStyle = colour;
    ctx.fillRect(x - thick / 2, ty - size - 4, tw, size + 4);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x + 4, ty - 2);
  });
}

function showFaces() {
  facesList.replaceChildren(...faces.map((f, i) => {
    const li = document.createElement("li");
    li.textContent = `${f.label} ${f.probability.toFixed(2)}`;
    li.dataset.label = f.label;
    li.dataset.probability = String(f.probability);
    li.dataset.box = f.box.map((v) => Math.round(v)).join(",");
    li.dataset.probabilities = JSON.stringify(f.probabilities);
    li.classList.toggle("chosen", i === chosen);
    li.addEventListener("click", () => choose(i));
    return li;
  }));
  document.body.dataset.faces = String(faces.length);
  showChart();
}

function showChart() {
  const f = faces[chosen];
  if (!f) { chart.replaceChildren(); return; }
  const names = classes.length ? classes : Object.keys(f.probabilities);
  chart.replaceChildren(...names.map((c) => {
    const p = f.probabilities[c] ?? 0;
    const row = document.createElement("div");
    row.className = "bar" + (c === f.label ? " top" : "");
    row.dataset.class = c;
    const name = document.createElement("span");
    name.textContent = c;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = p.toFixed(3);
    row.append(name, track, value);
    return row;
  }));
}

function choose(i) {
  chosen = i;
  showFaces();
  draw();
}

view.addEventListener("click", (event) => {
  const r = view.getBoundingClientRect();
  const x = (event.clientX - r.left) * view.width / r.width;
  const y = (event.clientY - r.top) * view.height / r.height;
  const i = faces.findIndex((f) => x >= f.box[0] && x <= f.box[0] + f.box[2] && y >= f.box[1] && y <= f.box[1] + f.box[3]);
  if (i >= 0) choose(i);
});

// ---------------------------------------------------------------------------------- the API
async function predict(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  count("sent");
  const r = await fetch(explain.checked ? "/api/predict?cam=true" : "/api/predict", { method: "POST", body: form });
  let body;
  try { body = await r.json(); } catch (e) { body = { error: `the server answered ${r.status}` }; }
  count("answered");
  if (!r.ok) throw new Error(body.error || `the server answered ${r.status}`);
  return body;
}

async function setExplanation(document_) {
  if (!document_.cam) { explanation = null; document.body.dataset.cam = "off"; return; }
  const img = new Image();
  img.src = document_.cam.image;
  await img.decode();
  explanation = img;
  document.body.dataset.cam = "shown";
}

function setFaces(document_, scale) {
  const previous = faces[chosen];
  faces = document_.faces.map((f) => ({ ...f, box: f.box.map((v) => v * scale) }));
  chosen = Math.min(previous ? chosen : 0, Math.max(0, faces.length - 1));
  showFaces();
}

// ---------------------------------------------------------------------------------- upload
document.getElementById("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  stopCamera();
  await show(file);
});

explain.addEventListener("change", () => {
  if (!stream && lastFile) show(lastFile);  // the camera's next frame asks by itself
  else draw();
});

async function show(file) {
  lastFile = file;
  say(`${file.name}: looking for faces…`);
  try {
    const [document_, bitmap] = await Promise.all([predict(file, file.name), decode(file)]);
    picture = bitmap;
    if (bitmap) { view.width = bitmap.width; view.height = bitmap.height; }
    await setExplanation(document_);
    setFaces(document_, 1);
    draw();
    say(faces.length ? `${file.name}: ${faces.length} face${faces.length > 1 ? "s" : ""}` + (faces.length > 1 ? " (click one to see its chart)" : "")
                     : (document_.messages[0] || `${file.name}: no face found`));
  } catch (e) {
    faces = []; explanation = null; showFaces(); draw();
    say(e.message, true);
  }
}

async function decode(file) {
  try { return await createImageBitmap(file); } catch (e) { return null; } // the server may still read it
}

// ---------------------------------------------------------------------------------- camera
cameraButton.addEventListener("click", () => (stream ? stopCamera() : startCamera()));

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    say("this browser offers no camera here (the page must be on localhost or https)", true);
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (e) {
    say(`no camera: ${e.message || e.name}`, true);
    return;
  }
  video.srcObject = stream;
  await video.play();
  view.width = video.videoWidth || 640;
  view.height = video.videoHeight || 480;
  picture = video;
  lastFile = null; explanation = null;
  faces = []; showFaces();
  cameraButton.textContent = "Stop camera";
  cameraButton.classList.add("on");
  document.body.dataset.camera = "on";
  say("camera on: frames go to the server at most " + FRAMES_PER_SECOND + " a second");
  requestAnimationFrame(tick);
}

function stopCamera() {
  if (!stream) return;
  stream.getTracks().forEach((t) => t.stop());
  stream = null;
  video.srcObject = null;
  cameraButton.textContent = "Start camera";
  cameraButton.classList.remove("on");
  document.body.dataset.camera = "off";
  if (picture === video) picture = null;
  say("camera off");
}

const frame = document.createElement("canvas");

function tick(now) {
  if (!stream) return;
  draw();
  if (!inFlight && now - lastSent >= 1000 / FRAMES_PER_SECOND && video.videoWidth) {
    lastSent = now;
    sendFrame();
  }
  requestAnimationFrame(tick);
}

function sendFrame() {
  const scale = Math.min(1, FRAME_SIDE / Math.max(video.videoWidth, video.videoHeight));
  frame.width = Math.round(video.videoWidth * scale);
  frame.height = Math.round(video.videoHeight * scale);
  frame.getContext("2d").drawImage(video, 0, 0, frame.width, frame.height);
  inFlight = true;
  frame.toBlob(async (blob) => {
    try {
      if (!blob || !stream) return;
      const document_ = await predict(blob, "camera.jpg");
      if (!stream) return;
      await setExplanation(document_);
      setFaces(document_, view.width / frame.width);
      say(`camera on: ${faces.length} face${faces.length === 1 ? "" : "s"} · ${counts.answered} frames answered`);
    } catch (e) {
      say(e.message, true);
    } finally {
      inFlight = false;
    }
  }, "image/jpeg", 0.85);
}

loadModel();
draw();
