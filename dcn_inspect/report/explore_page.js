// dcn-inspect explore: the sampling tree of one unit of the top followed deformable layer,
// computed here from the embedded offset (and mask) fields, drawn over the embedded image.
// Plain JavaScript, no framework, no network: everything the page needs is in the page.
//
// Coordinates: original-image pixels, COCO convention ((0, 0) = top-left corner of the top-left
// pixel, x right, y down), as sample-points' CSV. The URL fragment holds the selection:
// #unit=X,Y&levels=1,2,3 (the unit nearest to (X, Y), clamped into the map; the levels drawn),
// &group=G|mean (the offset group traced, when the layers have several) and &map=L (the dense
// offset map of level L drawn under the trees).
"use strict";

const DATA = JSON.parse(document.getElementById("explore-data").textContent);
const LAYERS = DATA.layers.map(decodeLayer);
const TOP = LAYERS[0];
const [SCALE_X, SCALE_Y] = DATA.scale_to_original;
const [IMAGE_H, IMAGE_W] = DATA.original_hw;

// One layer's field: base64 of little-endian float32 [C, H, W], C = dy's (K), dx's (K) and, with
// a DCNv2 mask, the masks (K), K = kh * kw kernel points row-major (the tracer's layout).
// `field` is offset group 0's; `group_fields` holds the other groups' and the mean's ("1", ...,
// "mean") of a layer with several groups (a layer with one group uses it for every choice).
function decodeField(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

function decodeLayer(layer) {
  const byGroup = { 0: decodeField(layer.field) };
  for (const [choice, base64] of Object.entries(layer.group_fields || {})) {
    byGroup[choice] = decodeField(base64);
  }
  return Object.assign({}, layer, { byGroup: byGroup });
}

// The field a layer is traced with: that of the chosen offset group (or mean), else group 0's.
function fieldOf(layer) {
  return layer.byGroup[state.group] || layer.byGroup["0"];
}

// Bilinear read of all C channels of a layer's field at the fractional (row, col) of its
// output map, with the op's border rule: zero unless -1 < row < H and -1 < col < W; corners
// outside the map contribute zero. Mirrors dcn_inspect.analysis.sample_points.read_field.
function readField(layer, row, col) {
  const [height, width] = layer.output_hw;
  const channels = layer.channels;
  const values = fieldOf(layer);
  const out = new Float64Array(channels);
  if (!(row > -1 && row < height && col > -1 && col < width)) return out;
  const top = Math.floor(row);
  const left = Math.floor(col);
  const fy = row - top;
  const fx = col - left;
  const corners = [
    [0, 0, (1 - fy) * (1 - fx)],
    [0, 1, (1 - fy) * fx],
    [1, 0, fy * (1 - fx)],
    [1, 1, fy * fx],
  ];
  for (const [dy, dx, weight] of corners) {
    const y = top + dy;
    const x = left + dx;
    if (y < 0 || y >= height || x < 0 || x >= width) continue;
    for (let c = 0; c < channels; c++) {
      out[c] += values[(c * height + y) * width + x] * weight;
    }
  }
  return out;
}

// THE MATH: the sampling tree of top-layer unit (row, col), the same rule as
// dcn_inspect.analysis.sample_points.trace_sampling_trees (no rounding, the chosen offset
// group or the groups' mean, as sample-points --group). Level by level, top layer first:
//   1. at each current position (fractional row, col of the layer's output map) read the
//      layer's offsets dy, dx (and masks m) bilinearly (readField);
//   2. kernel point (a, b) samples the layer's input index
//        y = row * stride_y - pad_y + a * dil_y + dy,   x = col * stride_x - pad_x + b * dil_x + dx
//      -> image pixels through the layer's input frame: X = off_x + stride_x * x (same for Y),
//      times scale_to_original; a point is "inside" when -1 < y < H_in and -1 < x < W_in;
//      its weight is the parent's weight times m (1 without a mask);
//   3. the image position -> fractional (row, col) of the next (lower) layer's output frame:
//      col = (X - off_x) / stride_x, row = (Y - off_y) / stride_y (model-input pixels).
// Point p of level l is kernel point p % K of parent p // K (the CSV's order).
// Returns {unitX, unitY, levels: [{xs, ys, weights, inside}, ...]} in original-image pixels.
function traceTree(row, col) {
  const unitFrame = TOP.output_frame;
  let rows = [row];
  let cols = [col];
  let parentWeights = [1];
  const levels = [];
  LAYERS.forEach((layer, index) => {
    const [kh, kw] = layer.kernel;
    const K = kh * kw;
    const [inH, inW] = layer.input_hw;
    const frame = layer.input_frame;
    const next = LAYERS[index + 1];
    const level = { xs: [], ys: [], weights: [], inside: [] };
    const nextRows = [];
    const nextCols = [];
    rows.forEach((r, n) => {
      const c = cols[n];
      const v = readField(layer, r, c);
      for (let a = 0; a < kh; a++) {
        for (let b = 0; b < kw; b++) {
          const k = a * kw + b;
          const y = r * layer.stride[0] - layer.padding[0] + a * layer.dilation[0] + v[k];
          const x = c * layer.stride[1] - layer.padding[1] + b * layer.dilation[1] + v[K + k];
          const imageX = frame.offset_x + frame.stride_x * x;
          const imageY = frame.offset_y + frame.stride_y * y;
          level.xs.push(imageX * SCALE_X);
          level.ys.push(imageY * SCALE_Y);
          level.weights.push(layer.modulated ? parentWeights[n] * v[2 * K + k] : parentWeights[n]);
          level.inside.push(y > -1 && y < inH && x > -1 && x < inW);
          if (next) {
            nextCols.push((imageX - next.output_frame.offset_x) / next.output_frame.stride_x);
            nextRows.push((imageY - next.output_frame.offset_y) / next.output_frame.stride_y);
          }
        }
      }
    });
    levels.push(level);
    rows = nextRows;
    cols = nextCols;
    parentWeights = level.weights;
  });
  return {
    unitX: (unitFrame.offset_x + unitFrame.stride_x * col) * SCALE_X,
    unitY: (unitFrame.offset_y + unitFrame.stride_y * row) * SCALE_Y,
    levels: levels,
  };
}

// The unit whose centre is nearest to original-image point (x, y), clamped into the top map
// (as sample-points' `at`: dcn_inspect.analysis.unit_selection.nearest_unit).
function nearestUnit(x, y) {
  const f = TOP.output_frame;
  const col = (x - f.offset_x * SCALE_X) / (f.stride_x * SCALE_X);
  const row = (y - f.offset_y * SCALE_Y) / (f.stride_y * SCALE_Y);
  const [height, width] = TOP.output_hw;
  const clamp = (v, n) => Math.min(Math.max(Math.floor(v + 0.5), 0), n - 1);
  return { row: clamp(row, height), col: clamp(col, width) };
}

// Mask-weighted RMS distance of the deepest level's points from the unit centre (pixels).
function spread(tree) {
  const deepest = tree.levels[tree.levels.length - 1];
  let total = 0;
  let sum = 0;
  deepest.xs.forEach((x, i) => {
    const w = deepest.weights[i];
    total += w;
    sum += w * ((x - tree.unitX) ** 2 + (deepest.ys[i] - tree.unitY) ** 2);
  });
  return total > 0 ? Math.sqrt(sum / total) : NaN;
}

// ---------------------------------------------------------------------------------------------
// Page state: the pinned unit (click, arrow keys, fragment), the hovered one, the levels drawn.

// group: the offset-group choice traced ("0", ..., "mean"); map: the level whose dense offset map
// is drawn under the trees (0: none).
const state = {
  pinned: null,
  hovered: null,
  levels: new Set(LAYERS.map((_, i) => i + 1)),
  group: DATA.group,
  map: 0,
};
const GROUPS = DATA.groups; // the embedded choices; empty when the layers have one group
const canvas = document.getElementById("view");
const image = document.getElementById("image");
const BAND = Math.round(DATA.style.band * Math.max(IMAGE_W, IMAGE_H));
const VIEW_SCALE = DATA.style.view_size / Math.max(IMAGE_W + 2 * BAND, IMAGE_H + 2 * BAND);

// Read the selection from the fragment; the image centre's unit when there is none.
function readFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const at = (params.get("unit") || "").split(",").map(Number);
  const unit =
    at.length === 2 && at.every(Number.isFinite)
      ? nearestUnit(at[0], at[1])
      : nearestUnit(IMAGE_W / 2, IMAGE_H / 2);
  state.pinned = unit;
  if (params.has("levels")) {
    const wanted = params.get("levels").split(",").map(Number);
    state.levels = new Set(wanted.filter((l) => l >= 1 && l <= LAYERS.length));
  }
  if (GROUPS.includes(params.get("group"))) state.group = params.get("group");
  const map = Number(params.get("map"));
  state.map = Number.isInteger(map) && map >= 1 && map <= LAYERS.length ? map : 0;
}

function writeFragment() {
  const tree = traceTree(state.pinned.row, state.pinned.col);
  const levels = Array.from(state.levels).sort((a, b) => a - b).join(",");
  let text = `#unit=${format(tree.unitX)},${format(tree.unitY)}&levels=${levels}`;
  if (GROUPS.length) text += `&group=${state.group}`;
  if (state.map) text += `&map=${state.map}`;
  if (location.hash === text) return;
  try {
    history.replaceState(null, "", text);
  } catch (error) { // some browsers refuse it for file: pages
    location.hash = text;
  }
}

function levelColour(level) {
  if (level === LAYERS.length) return DATA.style.deepest;
  return DATA.style.levels[(level - 1) % DATA.style.levels.length];
}


function draw(tree) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = DATA.style.band_colour;
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, BAND * VIEW_SCALE, BAND * VIEW_SCALE, IMAGE_W * VIEW_SCALE,
    IMAGE_H * VIEW_SCALE);
  drawOffsetMap(ctx);
  drawCategoryBox(ctx, tree);
  // Deepest level first, so the fewer points of the upper levels stay on top.
  for (let level = LAYERS.length; level >= 1; level--) {
    if (!state.levels.has(level)) continue;
    const points = tree.levels[level - 1];
    const peak = points.weights.reduce((a, b) => Math.max(a, b), -Infinity);
    const low = points.weights.reduce((a, b) => Math.min(a, b), Infinity);
    const flat = low === peak || peak <= 0; // no information: every point opaque
    const radius = level === LAYERS.length ? 2.5 : 4;
    ctx.lineWidth = 1;
    points.xs.forEach((x, i) => {
      const [px, py] = toCanvas(x, points.ys[i]);
      const alpha = flat ? 1 : Math.min(Math.max(points.weights[i] / peak, DATA.style.min_alpha), 1);
      ctx.globalAlpha = alpha;
      ctx.fillStyle = ctx.strokeStyle = levelColour(level);
      ctx.beginPath();
      if (points.inside[i]) {
        ctx.arc(px, py, radius, 0, 2 * Math.PI);
        ctx.fill();
        ctx.strokeStyle = DATA.style.edge;
        ctx.stroke();
      } else { // outside the map it samples: a cross
        ctx.moveTo(px - radius, py - radius);
        ctx.lineTo(px + radius, py + radius);
        ctx.moveTo(px + radius, py - radius);
        ctx.lineTo(px - radius, py + radius);
        ctx.stroke();
      }
    });
  }
  ctx.globalAlpha = 1;
  const [ux, uy] = toCanvas(tree.unitX, tree.unitY);
  ctx.fillStyle = DATA.style.unit;
  ctx.strokeStyle = DATA.style.edge;
  ctx.fillRect(ux - 5, uy - 5, 10, 10);
  ctx.strokeRect(ux - 5, uy - 5, 10, 10);
}

// The dense offset map of level state.map (if any) over the image, under the trees: one cell per
// unit of the layer, spanning the map's extent [x0, x1, y0, y1] (image pixels), drawn without
// smoothing and with the offsets figure's opacity, clipped to the image.
const mapImages = {}; // data URI -> its <img>, decoded once
function drawOffsetMap(ctx) {
  if (!state.map) return;
  const layerMap = DATA.offset_maps[state.map - 1];
  const uri = layerMap.maps[state.group] || layerMap.maps["0"];
  if (!mapImages[uri]) {
    mapImages[uri] = new Image();
    mapImages[uri].addEventListener("load", refresh);
    mapImages[uri].src = uri;
  }
  const picture = mapImages[uri];
  if (!picture.complete || !picture.naturalWidth) return; // drawn once loaded
  const [x0, x1, y0, y1] = layerMap.extent;
  ctx.save();
  ctx.beginPath();
  ctx.rect(BAND * VIEW_SCALE, BAND * VIEW_SCALE, IMAGE_W * VIEW_SCALE, IMAGE_H * VIEW_SCALE);
  ctx.clip();
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = layerMap.alpha;
  ctx.drawImage(picture, (x0 + BAND) * VIEW_SCALE, (y0 + BAND) * VIEW_SCALE,
    (x1 - x0) * VIEW_SCALE, (y1 - y0) * VIEW_SCALE);
  ctx.restore();
}

// The unit's category when boxes are known: sample-points' rule (the smallest box containing
// the unit's centre, else background), precomputed per top-layer unit (row-major) in Python.
function categoryOf(unit) {
  if (!DATA.categories) return null;
  const index = DATA.categories.units[unit.row * TOP.output_hw[1] + unit.col];
  return index < 0 ? { text: "background", coords: null } : DATA.categories.boxes[index];
}

// The box of the shown unit's category, dashed.
function drawCategoryBox(ctx, tree) {
  const category = categoryOf(nearestUnit(tree.unitX, tree.unitY));
  if (!category || !category.coords) return;
  const [x1, y1, x2, y2] = category.coords;
  const [left, top] = toCanvas(x1, y1);
  const [right, bottom] = toCanvas(x2, y2);
  ctx.save();
  ctx.setLineDash([6, 4]);
  ctx.lineWidth = 2;
  ctx.strokeStyle = DATA.style.unit;
  ctx.strokeRect(left, top, right - left, bottom - top);
  ctx.restore();
}

// The unit's points, every level (whatever is drawn): the same values as sample-points' CSV.
function fillTable(tree) {
  const body = document.querySelector("#points tbody");
  const rows = [];
  tree.levels.forEach((points, index) => {
    points.xs.forEach((x, i) => {
      const weight = String(Number(points.weights[i].toPrecision(6)));
      rows.push(`<tr><td>${index + 1}</td><td>${x.toFixed(4)}</td>` +
        `<td>${points.ys[i].toFixed(4)}</td><td>${weight}</td></tr>`);
    });
  });
  body.innerHTML = rows.join("");
}

function show(unit) {
  const tree = traceTree(unit.row, unit.col);
  draw(tree);
  fillTable(tree);
  document.getElementById("unit").textContent =
    `(x, y) = (${format(tree.unitX)}, ${format(tree.unitY)})  row ${unit.row}, col ${unit.col}`;
  document.getElementById("spread").textContent = spread(tree).toFixed(2);
  const category = categoryOf(unit);
  if (category) document.getElementById("category").textContent = category.text;
}

function refresh() {
  show(state.hovered || state.pinned);
}

function pin(unit) {
  state.pinned = unit;
  writeFragment();
  refresh();
}

// The unit under the mouse (original-image pixels from canvas pixels).
function unitAt(event) {
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * (canvas.width / box.width)) / VIEW_SCALE - BAND;
  const y = ((event.clientY - box.top) * (canvas.height / box.height)) / VIEW_SCALE - BAND;
  return nearestUnit(x, y);
}

function buildLevelToggles() {
  const holder = document.getElementById("levels");
  LAYERS.forEach((layer, index) => {
    const level = index + 1;
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `level-${level}`;
    box.checked = state.levels.has(level);
    box.addEventListener("change", () => {
      if (box.checked) state.levels.add(level);
      else state.levels.delete(level);
      writeFragment();
      refresh();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = levelColour(level);
    label.append(box, swatch, ` level ${level}: ${layer.name}`);
    holder.append(label);
  });
}

// The offset-group select (several groups) and the offset-map toggle and its layer select.
function buildGroupAndMapControls() {
  const groupSelect = document.getElementById("group");
  if (groupSelect) {
    GROUPS.forEach((choice) => groupSelect.add(new Option(choice, choice)));
    groupSelect.value = state.group;
    groupSelect.addEventListener("change", () => {
      state.group = groupSelect.value;
      writeFragment();
      refresh();
    });
  }
  const mapBox = document.getElementById("offset-map");
  const mapLayer = document.getElementById("offset-map-layer");
  LAYERS.forEach((layer, index) => mapLayer.add(new Option(`level ${index + 1}: ${layer.name}`,
    String(index + 1))));
  const update = () => {
    state.map = mapBox.checked ? Number(mapLayer.value) : 0;
    writeFragment();
    refresh();
  };
  mapBox.addEventListener("change", update);
  mapLayer.addEventListener("change", update);
  syncControls();
}

// Controls follow the state (after the fragment changed).
function syncControls() {
  const groupSelect = document.getElementById("group");
  if (groupSelect) groupSelect.value = state.group;
  document.getElementById("offset-map").checked = state.map > 0;
  if (state.map) document.getElementById("offset-map-layer").value = String(state.map);
  document.querySelectorAll("#levels input").forEach((box, index) => {
    box.checked = state.levels.has(index + 1);
  });
}

function onKey(event) {
  const step = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  const move = step[event.key];
  if (!move) return;
  event.preventDefault();
  const [height, width] = TOP.output_hw;
  const row = Math.min(Math.max(state.pinned.row + move[0], 0), height - 1);
  const col = Math.min(Math.max(state.pinned.col + move[1], 0), width - 1);
  state.hovered = null;
  pin({ row: row, col: col });
}

function start() {
  canvas.width = Math.round((IMAGE_W + 2 * BAND) * VIEW_SCALE);
  canvas.height = Math.round((IMAGE_H + 2 * BAND) * VIEW_SCALE);
  readFragment();
  buildLevelToggles();
  buildGroupAndMapControls();
  canvas.addEventListener("mousemove", (event) => {
    state.hovered = unitAt(event);
    refresh();
  });
  canvas.addEventListener("mouseleave", () => {
    state.hovered = null;
    refresh();
  });
  canvas.addEventListener("click", (event) => {
    state.hovered = null;
    pin(unitAt(event));
  });
  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", () => {
    readFragment();
    syncControls();
    refresh();
  });
  document.getElementById("copy").addEventListener("click", copyCsv);
  refresh();
  if (!image.complete) image.addEventListener("load", refresh);
}

start();
