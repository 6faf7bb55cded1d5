"""The report's page: one HTML file with its data and images inline, drawn by a small script.

No network, no library: the page opens from disk. The data (``report.json``'s content) and the
images (PNG data URIs by key) sit in two JSON script blocks; the script builds the adapter's card,
the sortable atoms table, the selected atom's activation map over the image (per band of sampler
steps), its removed / doubled images and the slider over k.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

DATA_ID, IMAGES_ID = "atomtune-data", "atomtune-images"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; }
.muted { color: #666; } .row { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid #e4e4e8; text-align: left; }
th { cursor: pointer; user-select: none; background: #f4f4f7; position: sticky; top: 0; }
#atoms-wrap { max-height: 420px; margin-top: 12px; overflow: auto; border: 1px solid #e4e4e8; }
#atoms tbody tr { cursor: pointer; } #atoms tbody tr:hover { background: #f0f4ff; }
#atoms tbody tr.selected { background: #dce6ff; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 8px; background: #5b6cff; vertical-align: middle; margin-right: 4px; }
figure { margin: 0; text-align: center; } figcaption { font-size: 12px; color: #555; margin-top: 3px; }
img.pic, canvas.overlay { width: 192px; height: 192px; image-rendering: pixelated; display: block; }
.stack { position: relative; width: 192px; height: 192px; } .stack canvas { position: absolute; left: 0; top: 0; }
.k-strip { display: flex; gap: 6px; flex-wrap: wrap; } .k-strip img { width: 72px; height: 72px; image-rendering: pixelated; cursor: pointer; border: 2px solid transparent; }
.k-strip img.current { border-color: #5b6cff; } button { margin: 2px; } button.on { background: #5b6cff; color: #fff; border-color: #5b6cff; }
.card td:first-child { color: #555; } code { background: #f4f4f7; padding: 0 3px; }
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('atomtune-data').textContent);
const I = JSON.parse(document.getElementById('atomtune-images').textContent);
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, text) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; return e; };
const fmt = (x, d = 3) => (x === null || x === undefined) ? '—' : (Math.abs(x) >= 1e4 ? x.toLocaleString() : Number(x).toPrecision(d));
let prompt = 0, band = D.bands.length - 1, selected = null, sortKey = 'contribution', sortDir = -1;

function card() {
  const c = D.card, t = $('card'), sp = c.sparsity || {};
  const rows = [['adapter', c.adapter], ['method', c.method], ['base model', c.base_model],
    ['trainable parameters', c.trainable_params.toLocaleString()],
    ['live atoms per module (mean)', fmt(sp.live_atoms)], ['atoms active per token (mean)', fmt(sp.active_per_token)],
    ['zero coefficients (true sparsity)', fmt(100 * sp.zero_share, 3) + '%'],
    ['atoms carrying 90% of a module', fmt(sp.atoms_for_share)]];
  if (c.merged_from) rows.push(['merged from', `${c.merged_from.how}: concept ${c.merged_from.concept}, style ${c.merged_from.style}`]);
  for (const [k, v] of rows) { const tr = el('tr'); tr.append(el('td', {}, k), el('td', {}, String(v))); t.append(tr); }
  const s = $('settings');
  for (const [k, v] of Object.entries(c.settings)) { const tr = el('tr'); tr.append(el('td', {}, k), el('td', {}, JSON.stringify(v))); s.append(tr); }
}

function promptPicker() {
  const s = $('prompt');
  D.prompts.forEach((p, i) => s.append(el('option', { value: i }, p)));
  s.onchange = () => { prompt = +s.value; slider(); detail(); };
}

function slider() {
  const r = $('k'), row = D.slider[prompt];
  r.max = D.ks.length - 1; if (+r.value > +r.max) r.value = r.max;
  const strip = $('k-strip'); strip.replaceChildren();
  row.forEach((key, i) => { const im = el('img', { src: I[key], class: 'k-image', 'data-k': D.ks[i], title: 'k = ' + D.ks[i] });
    im.onclick = () => { r.value = i; show(); }; strip.append(im); });
  const show = () => { const i = +r.value; $('k-image').src = I[row[i]];
    $('k-label').textContent = D.ks[i] === 0 ? 'k = 0: the pretrained model' :
      (i === D.ks.length - 1 ? `k = ${D.ks[i]}: the full adapter` : `k = ${D.ks[i]}: the top ${D.ks[i]} atoms of every module`);
    strip.querySelectorAll('img').forEach((im, j) => im.classList.toggle('current', j === i)); };
  r.oninput = show; show();
}

function atomsTable() {
  const merged = !!D.card.merged_from, head = $('atoms-head'), body = $('atoms-body');
  const cols = [['module', 'module'], ['id', 'atom id'], ['contribution', 'contribution E|s|·‖d‖'],
    ['share', 'share of module'], ['frequency', 'P(s≠0)']].concat(merged ? [['source', 'from']] : []);
  head.replaceChildren(); const tr = el('tr');
  for (const [k, label] of cols) { const th = el('th', { 'data-key': k }, label);
    th.onclick = () => { sortDir = (sortKey === k) ? -sortDir : -1; sortKey = k; atomsTable(); }; tr.append(th); }
  head.append(tr);
  const rows = D.layers.flatMap(l => l.atoms.map(a => ({ module: l.module, ...a })));
  rows.sort((a, b) => (a[sortKey] > b[sortKey] ? 1 : a[sortKey] < b[sortKey] ? -1 : 0) * sortDir);
  const top = Math.max(...rows.map(r => r.contribution), 1e-30);
  body.replaceChildren();
  for (const r of rows) {
    const t = el('tr', { 'data-module': r.module, 'data-id': r.id });
    if (selected && selected.module === r.module && selected.id === r.id) t.classList.add('selected');
    const bar = el('span', { class: 'bar', style: `width:${Math.round(60 * r.contribution / top)}px` });
    const c = el('td', { class: 'num' }); c.append(bar, document.createTextNode(fmt(r.contribution)));
    t.append(el('td', {}, r.module), el('td', { class: 'num' }, r.id), c, el('td', { class: 'num' }, fmt(100 * r.share, 3) + '%'),
      el('td', { class: 'num' }, fmt(r.frequency)));
    if (merged) t.append(el('td', {}, r.source));
    t.onclick = () => { selected = { module: r.module, id: r.id }; atomsTable(); detail(); };
    body.append(t);
  }
}

const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function color(v) { const x = Math.max(0, Math.min(1, v)) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
  return STOPS[i].map((c, j) => Math.round(c + f * (STOPS[i + 1][j] - c))); }

function drawMap(canvas, grid) {
  const rows = grid.length, cols = grid[0].length; canvas.width = cols; canvas.height = rows;
  const top = Math.max(...grid.flat(), 1e-30), ctx = canvas.getContext('2d'), img = ctx.createImageData(cols, rows);
  grid.flat().forEach((v, i) => { const [r, g, b] = color(v / top); img.data.set([r, g, b, Math.round(190 * Math.sqrt(v / top))], 4 * i); });
  ctx.putImageData(img, 0, 0); return top;
}

function figure(src, caption) { const f = el('figure'); f.append(el('img', { src, class: 'pic' }), el('figcaption', {}, caption)); return f; }

function detail() {
  const box = $('detail'); box.replaceChildren();
  if (!selected) { box.append(el('p', { class: 'muted' }, 'Click an atom in the table to see where it acts.')); return; }
  const { module, id } = selected;
  box.append(el('h3', { id: 'detail-title' }, `atom ${id} of ${module}`));
  const row = el('div', { class: 'row' });
  const maps = (D.maps[module] || {})[String(id)];
  const stack = el('div', { class: 'stack' }); stack.append(el('img', { src: I[D.full[prompt]], class: 'pic' }));
  const f = el('figure'); f.append(stack);
  if (maps) {
    const canvas = el('canvas', { class: 'overlay', id: 'atom-map' }); stack.append(canvas);
    const peak = drawMap(canvas, maps[prompt][band]);
    f.append(el('figcaption', {}, `|s| per image patch, ${D.bands[band]} (peak ${fmt(peak)})`));
    const buttons = el('div'); D.bands.forEach((label, b) => { const btn = el('button', { class: b === band ? 'on' : '' }, label);
      btn.onclick = () => { band = b; detail(); }; buttons.append(btn); }); f.append(buttons);
  } else {
    f.append(el('figcaption', {}, 'no map: this module does not act on image tokens, or the atom is outside the module\'s mapped top atoms'));
  }
  row.append(f);
  const shown = D.shown.find(s => s.module === module && s.id === id);
  if (shown) {
    row.append(figure(I[shown.removed[prompt].image], `removed: the image changes by ${fmt(100 * shown.removed[prompt].change)}% of the range`));
    row.append(figure(I[shown.doubled[prompt].image], `gain doubled: changes by ${fmt(100 * shown.doubled[prompt].change)}%`));
  } else {
    row.append(el('p', { class: 'muted' }, `Removed / doubled images are drawn for the ${D.shown.length} most important atoms over all modules (atomtune report --atoms-shown).`));
  }
  box.append(row);
}

card(); promptPicker(); $("k").max = D.ks.length - 1; $("k").value = D.ks.length - 1; slider();
if (D.shown.length) selected = { module: D.shown[0].module, id: D.shown[0].id };
atomsTable(); detail();
"""


def _json_opening(element_id: str) -> str:
    return f'<script type="application/json" id="{element_id}">'


def _json_block(element_id: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")).replace("</", "<\\/")  # no early end of the script
    return f"{_json_opening(element_id)}{text}</script>"


def render_page(data: dict[str, Any], images: dict[str, str]) -> str:
    """The page for ``data`` (see ``workflows.report``) and ``images`` (key -> PNG data URI)."""
    title = f"atomtune report: {data['card']['adapter']}"
    images_drawn = len(images)  # prompts x (k values + 2 x atoms shown): the last k is the full adapter
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">Seed {data["seed"]}, {data["steps"]} sampler steps, {data["size"][0]}x{data["size"][1]} px;
{images_drawn} images drawn. Importance is each atom's contribution E|s|·‖d‖ while drawing the prompts;
maps are |s| per image patch on the latent grid, averaged over both guidance halves.</p>
<h2>The adapter</h2>
<div class="row"><table class="card" id="card"></table>
<details><summary>settings</summary><table class="card" id="settings"></table></details></div>
<h2>Prompt</h2>
<select id="prompt"></select>
<h2>Top-k atoms of every module kept</h2>
<div class="row"><figure><img id="k-image" class="pic" alt="image at k"><figcaption id="k-label"></figcaption></figure>
<div><input type="range" id="k" min="0" value="0" step="1" style="width:320px"><div class="k-strip" id="k-strip"></div></div></div>
<h2>Atoms, per layer (click a column to sort, an atom to see it)</h2>
<div id="detail"></div>
<div id="atoms-wrap"><table id="atoms"><thead id="atoms-head"></thead><tbody id="atoms-body"></tbody></table></div>
{_json_block(DATA_ID, data)}
{_json_block(IMAGES_ID, images)}
<script>{SCRIPT}</script>
</body></html>
"""


def png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_page_data(page: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The data and images a written ``report.html`` carries (for tests and tools)."""
    text = Path(page).read_text(encoding="utf-8")

    def block(element_id: str) -> Any:
        start = text.index(_json_opening(element_id)) + len(_json_opening(element_id))
        return json.loads(text[start : text.index("</script>", start)].replace("<\\/", "</"))

    return block(DATA_ID), block(IMAGES_ID)
