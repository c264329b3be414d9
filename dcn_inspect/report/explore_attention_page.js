// dcn-inspect explore --attention: the sampling points of one encoder token of multi-scale
// deformable attention, looked up in the embedded per-token points, drawn over the image.
// Plain JavaScript, no framework, no network: everything the page needs is in the page.
//
// Coordinates: original-image pixels, COCO convention ((0, 0) = top-left corner of the top-left
// pixel, x right, y down), as the attention CSV. The URL fragment holds the selection:
// #token=X,Y&layer=NAME (the token of the finest level nearest to (X, Y), clamped into the map,
// as `dcn-inspect attention --queries encoder --at X,Y`; the encoder layer shown), or, for a
// decoder query of the list (the top ones by class score), #query=Q&layer=NAME (a decoder layer;
// the values `dcn-inspect attention --queries decoder --query Q` writes).
"use strict";

const DATA = JSON.parse(document.getElementById("explore-data").textContent);
const LAYERS = DATA.layers.map(decodeLayer);
// The decoder's top queries ({query, score, label, box}) and its layers, or null.
const DECODER = DATA.decoder
  ? { queries: DATA.decoder.queries, layers: DATA.decoder.layers.map(decodeLayer) }
  : null;
const [SCALE_X, SCALE_Y] = DATA.scale_to_original;
const [IMAGE_H, IMAGE_W] = DATA.original_hw;

// One layer's points: base64 of little-endian float32 [T, heads * P, 3] (x, y, weight), T the
// finest level's tokens row-major (a decoder layer: the listed queries in order), points
// head-major then in the record's order (the CSV's).
function decodeLayer(layer) {
  const text = atob(layer.points);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return Object.assign({}, layer, { values: new Float32Array(bytes.buffer) });
}

// The token whose cell centre is nearest to original-image point (x, y), clamped into the
// finest map: dcn_inspect.analysis.attention.nearest_tokens (model-input pixels = original /
// scale; cell index = (input - offset) / stride; floor(v + 0.5)).
function nearestToken(layer, x, y) {
  const f = layer.frame;
  const col = (x / SCALE_X - f.offset_x) / f.stride_x;
  const row = (y / SCALE_Y - f.offset_y) / f.stride_y;
  const [height, width] = layer.shape;
  const clamp = (v, n) => Math.min(Math.max(Math.floor(v + 0.5), 0), n - 1);
  return { row: clamp(row, height), col: clamp(col, width) };
}

// A token's cell centre (its own point, the reference drawn), original-image pixels:
// dcn_inspect.analysis.attention.token_centre.
function tokenCentre(layer, token) {
  const f = layer.frame;
  return [(f.offset_x + f.stride_x * token.col) * SCALE_X,
    (f.offset_y + f.stride_y * token.row) * SCALE_Y];
}

// The points of entry n (a token row * W + col, or a listed decoder query) of one layer:
// [{head, level, point, x, y, weight}, ...] in the CSV's order.
function pointsOf(layer, n) {
  const perHead = layer.point_level.length;
  const count = layer.heads * perHead;
  const base = n * count * 3;
  const points = [];
  for (let j = 0; j < count; j++) {
    const p = j % perHead;
    points.push({
      head: Math.floor(j / perHead),
      level: layer.point_level[p],
      point: layer.point_index[p],
      x: layer.values[base + 3 * j],
      y: layer.values[base + 3 * j + 1],
      weight: layer.values[base + 3 * j + 2],
    });
  }
  return points;
}

// ---------------------------------------------------------------------------------------------
// Page state: the pinned token (click, arrow keys, fragment), the hovered one, the layer shown
// (default: the last encoder layer).

// mode "query": a decoder query of the list is shown (state.query: its place in the list, in
// decoder layer state.decoderLayer) until the image is clicked or a token key pressed.
const state = {
  pinned: null,
  hovered: null,
  layer: LAYERS.length - 1,
  mode: "token",
  query: 0,
  decoderLayer: DECODER ? DECODER.layers.length - 1 : 0,
};
const canvas = document.getElementById("view");
const image = document.getElementById("image");
const select = document.getElementById("layer");
const BAND = Math.round(DATA.style.band * Math.max(IMAGE_W, IMAGE_H));
const VIEW_SCALE = DATA.style.view_size / Math.max(IMAGE_W + 2 * BAND, IMAGE_H + 2 * BAND);

function layer() {
  return LAYERS[state.layer];
}

// Read the selection from the fragment; the image centre's token when there is none.
function readFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  if (DECODER && params.has("query")) { // a decoder query: the first listed one if not listed
    state.mode = "query";
    const listed = DECODER.queries.findIndex((q) => String(q.query) === params.get("query"));
    state.query = Math.max(listed, 0);
    const layerAt = DECODER.layers.findIndex((l) => l.name === params.get("layer"));
    if (layerAt >= 0) state.decoderLayer = layerAt;
    document.getElementById("decoder-layer").value = DECODER.layers[state.decoderLayer].name;
    if (!state.pinned) state.pinned = nearestToken(layer(), IMAGE_W / 2, IMAGE_H / 2);
    select.value = layer().name;
    return;
  }
  state.mode = "token";
  const named = LAYERS.findIndex((l) => l.name === params.get("layer"));
  if (named >= 0) state.layer = named;
  const at = (params.get("token") || "").split(",").map(Number);
  state.pinned =
    at.length === 2 && at.every(Number.isFinite)
      ? nearestToken(layer(), at[0], at[1])
      : nearestToken(layer(), IMAGE_W / 2, IMAGE_H / 2);
  select.value = layer().name;
}

function writeFragment() {
  const [x, y] = tokenCentre(layer(), state.pinned);
  let text = `#token=${format(x)},${format(y)}&layer=${encodeURIComponent(layer().name)}`;
  if (state.mode === "query") {
    const name = DECODER.layers[state.decoderLayer].name;
    text = `#query=${DECODER.queries[state.query].query}&layer=${encodeURIComponent(name)}`;
  }
  if (location.hash === text) return;
  try {
    history.replaceState(null, "", text);
  } catch (error) { // some browsers refuse it for file: pages
    location.hash = text;
  }
}


// One marker: the shape tells the feature level (circle, square, triangle, diamond).
function marker(ctx, shape, px, py, r) {
  ctx.beginPath();
  if (shape === "square") ctx.rect(px - r, py - r, 2 * r, 2 * r);
  else if (shape === "triangle") {
    ctx.moveTo(px, py - r * 1.2);
    ctx.lineTo(px + r * 1.1, py + r * 0.8);
    ctx.lineTo(px - r * 1.1, py + r * 0.8);
    ctx.closePath();
  } else if (shape === "diamond") {
    ctx.moveTo(px, py - r * 1.3);
    ctx.lineTo(px + r, py);
    ctx.lineTo(px, py + r * 1.3);
    ctx.lineTo(px - r, py);
    ctx.closePath();
  } else ctx.arc(px, py, r, 0, 2 * Math.PI);
  ctx.fill();
  ctx.stroke();
}

function headColour(head) {
  return DATA.style.heads[head % DATA.style.heads.length];
}

// Image, then the points (weakest first, so the strongest stay on top), then the reference
// (the token's centre, or a decoder query's reference point) and a decoder query's box.
function draw(centre, points, box) {
  const ctx = canvas.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.fillStyle = DATA.style.band_colour;
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, BAND * VIEW_SCALE, BAND * VIEW_SCALE, IMAGE_W * VIEW_SCALE,
    IMAGE_H * VIEW_SCALE);
  const peak = points.reduce((a, p) => Math.max(a, p.weight), 0);
  const order = points.slice().sort((a, b) => a.weight - b.weight);
  ctx.lineWidth = 1;
  ctx.strokeStyle = DATA.style.edge;
  for (const p of order) {
    const [px, py] = toCanvas(p.x, p.y);
    ctx.globalAlpha = peak > 0 ? Math.min(Math.max(p.weight / peak, DATA.style.min_alpha), 1) : 1;
    ctx.fillStyle = headColour(p.head);
    const shape = DATA.style.markers[p.level % DATA.style.markers.length];
    marker(ctx, shape, px, py, 4);
  }
  ctx.globalAlpha = 1;
  if (box) {
    const [x0, y0] = toCanvas(box[0], box[1]);
    const [x1, y1] = toCanvas(box[2], box[3]);
    ctx.strokeStyle = DATA.style.box;
    ctx.lineWidth = 2;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.lineWidth = 1;
    ctx.strokeStyle = DATA.style.edge;
  }
  const [ux, uy] = toCanvas(centre[0], centre[1]);
  ctx.fillStyle = DATA.style.reference;
  ctx.fillRect(ux - 5, uy - 5, 10, 10);
  ctx.strokeRect(ux - 5, uy - 5, 10, 10);
}

// The points in the layer shown: the values the attention CSV holds for that token or query.
function fillTable(name, points) {
  const rows = points.map((p) =>
    `<tr><td>${name}</td><td>${p.head}</td><td>${p.level}</td><td>${p.point}</td>` +
    `<td>${p.x.toFixed(4)}</td><td>${p.y.toFixed(4)}</td>` +
    `<td>${String(Number(p.weight.toPrecision(6)))}</td></tr>`);
  document.querySelector("#points tbody").innerHTML = rows.join("");
}

function show(token) {
  const points = pointsOf(layer(), token.row * layer().shape[1] + token.col);
  const [x, y] = tokenCentre(layer(), token);
  draw([x, y], points, null);
  fillTable(layer().name, points);
  document.getElementById("what").textContent = "token";
  const [, width] = layer().shape;
  // token_start: index of the finest level's first token in the flattened sequence (the
  // attention CSV's `query`)
  document.getElementById("token").textContent =
    `(x, y) = (${format(x)}, ${format(y)})  row ${token.row}, col ${token.col}` +
    `  (query ${layer().token_start + token.row * width + token.col})`;
}

// A decoder query of the list: its points in the decoder layer chosen, reference and box.
function showQuery() {
  const decoderLayer = DECODER.layers[state.decoderLayer];
  const entry = DECODER.queries[state.query];
  const points = pointsOf(decoderLayer, state.query);
  draw(decoderLayer.references[state.query], points, entry.box);
  fillTable(decoderLayer.name, points);
  document.getElementById("what").textContent = "decoder query";
  document.getElementById("token").textContent =
    `${entry.query}: ${entry.label}, score ${entry.score.toFixed(2)}`;
}

// Hovering the image always shows the token under the mouse; otherwise the kept selection.
function refresh() {
  if (!state.hovered && state.mode === "query") showQuery();
  else show(state.hovered || state.pinned);
}

function pin(token) {
  state.pinned = token;
  writeFragment();
  refresh();
}

// The token under the mouse (original-image pixels from canvas pixels).
function tokenAt(event) {
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * (canvas.width / box.width)) / VIEW_SCALE - BAND;
  const y = ((event.clientY - box.top) * (canvas.height / box.height)) / VIEW_SCALE - BAND;
  return nearestToken(layer(), x, y);
}

// The legend: one swatch per head.
function buildLegend() {
  const holder = document.getElementById("heads");
  for (let head = 0; head < Math.max(...LAYERS.map((l) => l.heads)); head++) {
    const label = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = headColour(head);
    label.append(swatch, `head ${head} `);
    holder.append(label);
  }
}

function onKey(event) {
  const step = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  const move = step[event.key];
  if (!move || event.target.tagName === "SELECT") return;
  event.preventDefault();
  const [height, width] = layer().shape;
  const row = Math.min(Math.max(state.pinned.row + move[0], 0), height - 1);
  const col = Math.min(Math.max(state.pinned.col + move[1], 0), width - 1);
  state.hovered = null;
  state.mode = "token";
  pin({ row: row, col: col });
}

// The decoder's list and layer select (when the page has a decoder).
function wireDecoder() {
  if (!DECODER) return;
  const choose = document.getElementById("decoder-layer");
  choose.value = DECODER.layers[state.decoderLayer].name;
  choose.addEventListener("change", () => {
    state.decoderLayer = DECODER.layers.findIndex((l) => l.name === choose.value);
    state.mode = "query";
    writeFragment();
    refresh();
  });
  document.querySelectorAll("#queries button").forEach((button) => {
    button.addEventListener("click", () => {
      state.query = DECODER.queries.findIndex((q) => String(q.query) === button.dataset.query);
      state.mode = "query";
      writeFragment();
      refresh();
    });
  });
}

function start() {
  canvas.width = Math.round((IMAGE_W + 2 * BAND) * VIEW_SCALE);
  canvas.height = Math.round((IMAGE_H + 2 * BAND) * VIEW_SCALE);
  readFragment();
  buildLegend();
  canvas.addEventListener("mousemove", (event) => {
    state.hovered = tokenAt(event);
    refresh();
  });
  canvas.addEventListener("mouseleave", () => {
    state.hovered = null;
    refresh();
  });
  canvas.addEventListener("click", (event) => {
    state.hovered = null;
    state.mode = "token";
    pin(tokenAt(event));
  });
  select.addEventListener("change", () => {
    state.layer = LAYERS.findIndex((l) => l.name === select.value);
    state.mode = "token";
    writeFragment(); // every encoder call samples the same finest map: the token stays
    refresh();
  });
  document.addEventListener("keydown", onKey);
  wireDecoder();
  window.addEventListener("hashchange", () => {
    readFragment();
    refresh();
  });
  document.getElementById("copy").addEventListener("click", copyCsv);
  refresh();
  if (!image.complete) image.addEventListener("load", refresh);
}

start();
