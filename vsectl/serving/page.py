"""The search page of `vsectl serve`: one HTML file with its style and script inline (nothing fetched from elsewhere).

Text from the collection or the user is only ever set with `textContent`, never parsed as HTML.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vsectl search</title>
<style>
  :root { --fg: #1d232a; --muted: #5d6b78; --line: #d8dee4; --accent: #2f6fde; --bg: #f6f8fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: var(--bg); }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); }
  h1 { font-size: 18px; margin: 0 0 10px; }
  h1 small { font-weight: normal; color: var(--muted); margin-left: 8px; }
  form { display: flex; gap: 8px; flex-wrap: wrap; align-items: center; }
  input[type=search] { flex: 1 1 320px; padding: 8px 10px; font-size: 16px; border: 1px solid var(--line);
                       border-radius: 6px; }
  select, button { padding: 8px 10px; font-size: 14px; border: 1px solid var(--line); border-radius: 6px;
                   background: #fff; }
  button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
  #status { color: var(--muted); margin: 12px 24px 0; min-height: 1.4em; }
  #status.error { color: #b42318; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 14px;
             padding: 14px 24px 32px; }
  .hit { background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
         display: flex; flex-direction: column; }
  .thumb { aspect-ratio: 1 / 1; background: #eef1f4; display: flex; align-items: center; justify-content: center;
           cursor: pointer; }
  .thumb img { width: 100%; height: 100%; object-fit: contain; }
  .thumb .none { color: var(--muted); font-size: 13px; }
  .meta { padding: 8px 10px 10px; }
  .score { font-variant-numeric: tabular-nums; color: var(--accent); font-weight: 600; }
  .rank { color: var(--muted); margin-right: 6px; }
  .caption { margin-top: 4px; }
  .id { color: var(--muted); font-size: 12px; margin-top: 4px; word-break: break-all; }
  #query { display: none; align-items: center; gap: 14px; margin: 12px 24px 0; padding: 10px; background: #fff;
           border: 2px solid var(--accent); border-radius: 8px; max-width: 640px; }
  #query.shown { display: flex; }
  #query .thumb { width: 120px; flex: 0 0 120px; cursor: default; }
  #query .label { color: var(--muted); font-size: 13px; }
</style>
</head>
<body>
<header>
  <h1>vsectl search <small id="info"></small></h1>
  <form id="form" autocomplete="off">
    <input id="q" name="q" type="search" placeholder="Describe an image, e.g. a red apple" autofocus>
    <select id="side" name="side" title="What to search">
      <option value="images">images</option><option value="captions">captions</option>
    </select>
    <select id="k" name="k" title="Results">
      <option>5</option><option selected>10</option><option>20</option><option>50</option>
    </select>
    <button type="submit">Search</button>
  </form>
</header>
<div id="status">Type a query; click a result to find similar images.</div>
<section id="query" aria-label="Query image"></section>
<main id="results"></main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const limits = { images: Infinity, captions: Infinity };  // k is clipped to the collection's size
const K_MAX = 100;  // the API's largest k
const kFor = (side) => String(Math.min(Number($("k").value), limits[side]));

// A k from the address (?k=12) that the menu does not list gets an entry of its own; an invalid one is ignored.
function setK(value) {
  const k = Number(value);
  if (!Number.isInteger(k) || k < 1 || k > K_MAX) return;
  const menu = $("k");
  if (![...menu.options].some((o) => Number(o.value) === k)) {
    const entry = el("option", null, String(k));
    const after = [...menu.options].find((o) => Number(o.value) > k);
    menu.insertBefore(entry, after || null);
  }
  menu.value = String(k);
}

// The image a similar-images search started from, shown above its results (hidden for text queries).
function showQuery(query) {
  const box = $("query");
  box.replaceChildren();
  box.className = query ? "shown" : "";
  if (!query) return;
  const thumb = el("div", "thumb");
  if (query.image_url) {
    const img = el("img");
    img.src = query.image_url;
    img.alt = query.caption || query.id;
    thumb.append(img);
  } else {
    thumb.append(el("span", "none", "no image file"));
  }
  const meta = el("div", "meta");
  meta.append(el("div", "label", "Images similar to"), el("div", "caption", query.caption || ""),
              el("div", "id", query.id));
  box.append(thumb, meta);
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function render(answer) {
  showQuery(answer.query_image);
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of answer.hits) {
    const card = el("article", "hit");
    card.dataset.image = hit.image;
    const thumb = el("div", "thumb");
    thumb.title = "Find images similar to this one";
    if (hit.image_url) {
      const img = el("img");
      img.src = hit.image_url;
      img.alt = hit.caption || hit.id;
      img.loading = "lazy";
      thumb.append(img);
    } else {
      thumb.append(el("span", "none", "no image file"));
    }
    thumb.addEventListener("click", () => similar(hit.image));
    const meta = el("div", "meta");
    const head = el("div");
    head.append(el("span", "rank", "#" + hit.rank), el("span", "score", hit.score.toFixed(3)));
    meta.append(head, el("div", "caption", hit.caption || ""), el("div", "id", hit.id));
    card.append(thumb, meta);
    grid.append(card);
  }
  const status = $("status");
  status.className = "";
  status.textContent = answer.hits.length + " " + answer.side + " for \\u201c" + answer.query + "\\u201d in "
    + answer.took_ms.toFixed(1) + " ms \\u00b7 " + how(answer.searched_with);
}

function how(w) {
  if (!w || w.kind === "exact") return "exact search";
  const recall = typeof w["recall@10"] === "number" ? ", recall@10 " + w["recall@10"].toFixed(3) : "";
  return w.kind + " index" + recall;
}

async function ask(url, state) {
  const status = $("status");
  status.className = "";
  status.textContent = "Searching\\u2026";
  try {
    const response = await fetch(url);
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    history.replaceState(null, "", "?" + new URLSearchParams(state).toString());
    render(answer);
  } catch (err) {
    $("results").replaceChildren();
    showQuery(null);
    status.className = "error";
    status.textContent = String(err.message || err);
  }
}

function search() {
  const side = $("side").value;
  const state = { q: $("q").value, k: kFor(side), side: side };
  return ask("/api/search?" + new URLSearchParams(state).toString(), state);
}

function similar(image) {
  const side = $("side").value;
  const state = { similar: image, k: kFor(side), side: side };
  const params = new URLSearchParams({ image: image, k: state.k, side: state.side });
  return ask("/api/similar?" + params.toString(), state);
}

$("form").addEventListener("submit", (event) => { event.preventDefault(); search(); });

(async () => {
  try {
    const info = await (await fetch("/api/info")).json();
    limits.images = info.images;
    limits.captions = info.captions;
    const ways = Object.entries(info.searched_with || {}).map(([side, w]) => side + ": " + how(w));
    $("info").textContent = [info.images + " images", info.captions + " captions", ...ways].join(" \\u00b7 ");
  } catch (err) { /* the page works without the counts */ }
  const params = new URLSearchParams(location.search);
  if (params.get("k")) setK(params.get("k"));
  if (params.get("side")) $("side").value = params.get("side");
  if (params.get("q")) { $("q").value = params.get("q"); search(); }
  else if (params.get("similar")) similar(params.get("similar"));
})();
</script>
</body>
</html>
"""
