// dcn-inspect explore: what both explorer pages (sampling trees of conv units; attention
// tokens and queries) share. Loaded before the page's own script, in the same global scope:
// it reads the page's BAND and VIEW_SCALE (the grey band around the image, the canvas scale).

// A position in the fragment: rounded to 4 decimals (no trailing zeros).
function format(value) {
  return String(Number(value.toFixed(4)));
}

// Canvas position of an image point, pinned to the band's edge when farther out.
function toCanvas(x, y) {
  const cx = Math.min(Math.max(x, -BAND), IMAGE_W + BAND);
  const cy = Math.min(Math.max(y, -BAND), IMAGE_H + BAND);
  return [(cx + BAND) * VIEW_SCALE, (cy + BAND) * VIEW_SCALE];
}

// The #points table as CSV, to the clipboard (or the old copy command where it is refused).
function copyCsv() {
  const header = document.querySelectorAll("#points thead th");
  const lines = [Array.from(header, (th) => th.textContent).join(",")];
  document.querySelectorAll("#points tbody tr").forEach((tr) => {
    lines.push(Array.from(tr.children, (td) => td.textContent).join(","));
  });
  const text = lines.join("\n") + "\n";
  const done = () => (document.getElementById("copied").textContent = "copied");
  if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text));
  else fallbackCopy(text);
}

function fallbackCopy(text) {
  const area = document.createElement("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  document.getElementById("copied").textContent = "copied";
}
